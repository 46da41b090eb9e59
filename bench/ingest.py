"""Ingest: the same N US instances pushed by DCMTK storescu to tuned storescp and to the node.

Both receivers get the identical files over loopback in one association, side by side in one run;
the figure is images/s and the node ÷ DCMTK ratio (target ≥ 0.5). The node runs exactly as in
production — ``dicom-node serve`` with durable archive + SQLite index — only scoring is off.

    .venv/bin/python bench/ingest.py --n 500 --repeats 3
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
from common import node_config, save_result

from bench.usdata import us_instances
from testing.peers import NodeProcess, StorescpPeer, storescu


def _node_count(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            return int(con.execute("select count(*) from instances").fetchone()[0])
    except sqlite3.Error:
        return -1


def run(n: int = 500, repeats: int = 3, timeout: float = 600.0) -> dict:
    """Measure both receivers ``repeats`` times (alternating) and return medians and the ratio."""
    files = sorted(us_instances(n).glob("*.dcm"))
    rates: dict[str, list[float]] = {"dcmtk": [], "node": []}
    stored: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for r in range(repeats):
            work = Path(tmp) / f"r{r}"
            peer = StorescpPeer(work / "dcmtk")
            try:
                secs = storescu(files, peer.port, peer.ae_title, timeout=timeout)
                stored["dcmtk"] = len(peer.received())
            finally:
                peer.stop()
            rates["dcmtk"].append(n / secs)
            data = work / "node" / "data"
            node = NodeProcess(work / "node", node_config(data))
            try:
                secs = storescu(files, node.port, node.ae_title, timeout=timeout)
                stored["node"] = _node_count(data / "index.sqlite")
            finally:
                node.stop()
            rates["node"].append(n / secs)
            print(f"  run {r + 1}: DCMTK storescp {rates['dcmtk'][-1]:.0f} img/s, "
                  f"dicom-node {rates['node'][-1]:.0f} img/s", flush=True)
    dcmtk, node_rate = statistics.median(rates["dcmtk"]), statistics.median(rates["node"])
    return {"n": n, "repeats": repeats, "dcmtk_img_s": dcmtk, "node_img_s": node_rate,
            "ratio": node_rate / dcmtk, "runs": rates, "stored": stored,
            "mb_per_instance": files[0].stat().st_size / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    res = run(args.n, args.repeats)
    print(f"ingest N={res['n']}: DCMTK storescp (TCP_NODELAY, 128 KiB PDU) "
          f"{res['dcmtk_img_s']:.0f} img/s | dicom-node serve {res['node_img_s']:.0f} img/s "
          f"| ratio {res['ratio']:.2f} "
          f"(target >= 0.5); stored {res['stored']}")
    save_result("ingest", res)
    return 0 if res["stored"].get("node") == res["n"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
