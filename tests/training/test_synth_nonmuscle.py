"""The gate on a seeded synthetic mix: >= 98 % of muscle images pass, >= 95 % of others stop."""

from __future__ import annotations

from training.synth_nonmuscle import KINDS, gate_mix, synth_mix, write_nonmuscle


def test_gate_rates_on_seeded_mix():
    images = synth_mix(n_muscle=60, n_other=60, seed=11)
    rates, _ = gate_mix(images)
    assert {im.kind for im in images} == {"muscle", *KINDS}
    assert any(not im.regions for im in images if im.kind == "muscle")
    assert rates["muscle_passed"] >= 0.98, rates
    assert rates["other_stopped"] >= 0.95, rates


def test_write_nonmuscle_is_deterministic(tmp_path):
    a = write_nonmuscle(tmp_path / "a", 5, seed=2)
    b = write_nonmuscle(tmp_path / "b", 5, seed=2)
    assert [e["sop_instance_uid"] for e in a] == [e["sop_instance_uid"] for e in b]
    assert (tmp_path / "a" / a[0]["path"]).read_bytes() == (tmp_path / "b" / b[0]["path"]).read_bytes()
    assert [e["kind"] for e in a] == list(KINDS)
