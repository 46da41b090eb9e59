"""Draw docs/img/vendors.png: one synthetic image per vendor profile, read back with its mask.

The picture is made the way the node sees data: generate a small cohort with
``training.synthetic.generate_cohort``, then read each vendor's first segmented image with
``inference.reader.read_study`` (decode, tissue-region crop, SEG matching) and outline the mask.

Usage: ``.venv/bin/python docs/make_vendor_figure.py [--out docs/img/vendors.png]``
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.decode import decode_frames  # noqa: E402
from inference.reader import read_study  # noqa: E402
from training.synthetic import generate_cohort  # noqa: E402

VENDORS = ("supersonic", "mindray", "samsung")


def _pick(cohort_dir: Path, vendor: str) -> tuple[list[Path], dict]:
    """Paths of the first single-frame, quirk-free segmented image of ``vendor`` and its SEG."""
    manifest = json.loads((cohort_dir / "manifest.json").read_text())
    for study in manifest["studies"]:
        if study["vendor"] != vendor:
            continue
        for f in study["files"]:
            if f["kind"] != "us" or f["frames"] != 1 or f["quirk"]:
                continue
            segs = [g for g in study["files"] if f["sop_instance_uid"] in g.get("references", [])]
            if segs:
                return [cohort_dir / f["path"], cohort_dir / segs[0]["path"]], f
    raise SystemExit(f"no segmented {vendor} image in the cohort")


def make_figure(out: Path, seed: int = 11, participants: int = 9) -> Path:
    """Generate, read back and draw; returns ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp)
        generate_cohort(cohort, participants=participants, seed=seed, image_scale=0.5, workers=1)
        fig, axes = plt.subplots(2, 3, figsize=(12, 6.6), gridspec_kw={"height_ratios": [1, 1.1]})
        for col, vendor in enumerate(VENDORS):
            paths, info = _pick(cohort, vendor)
            full = decode_frames(pydicom.dcmread(paths[0]))[0][1]
            study = read_study(paths)
            frame = study.frames[0]
            ax = axes[0, col]
            ax.imshow(full, cmap="gray", vmin=0, vmax=1)
            r0, c0, r1, c1 = frame.crop_box
            ax.add_patch(plt.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                                       ec="#ffcc00", lw=1.2))
            ax.set_title(f"{frame.manufacturer} {frame.model_name}\n"
                         f"{info['photometric']}, {pydicom.uid.UID(info['transfer_syntax']).name}",
                         fontsize=8.5)
            ax = axes[1, col]
            ax.imshow(frame.image, cmap="gray", vmin=0, vmax=1)
            if frame.mask is not None:
                ax.contour(frame.mask.astype(np.float32), levels=[0.5], colors="#ff3b30",
                           linewidths=1.6)
            sp = frame.spacing_cm
            ax.set_title(f"tissue region {r1 - r0}x{c1 - c0} px, "
                         f"{sp[0] * 10:.3f} mm/px" if sp else "uncalibrated", fontsize=8.5)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("Synthetic RF ultrasound per vendor profile: screen (crop in yellow) and the "
                     "reader's output with the DICOM-SEG outline (red)", fontsize=10)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        fig.savefig(buf, dpi=72)
        plt.close(fig)
        # Speckle does not compress; a 96-colour palette keeps the README picture < 300 KB.
        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=96, method=Image.Quantize.FASTOCTREE).save(
            out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "vendors.png")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    path = make_figure(args.out, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
