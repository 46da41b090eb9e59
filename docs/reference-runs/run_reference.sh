#!/usr/bin/env bash
# The 300-participant reference run of issue 13 (nested selection, calibration, both input
# scalings, the operating-point check on a fresh cohort). About 40 min on 2 quiet CPU cores.
#
#   docs/reference-runs/run_reference.sh [WORK_DIR]      (from the repository root)
#
# A finished training (its model.json exists in WORK_DIR) is not repeated: rerun to resume.
# Writes (reports + model.json, no weights) into docs/reference-runs/model300-v2 (ROI-box crop,
# image + clinical + lab + fusion) and docs/reference-runs/model300-v2-fov (physically scaled
# crop, image only), each with evaluation-seed8/ (the served ensemble on a fresh cohort), and
# docs/reference-runs/model300-v2-summary.md (OOF AUC vs the generator's oracle for both scalings).
set -euo pipefail
WORK=${1:-/tmp/dicom-node-reference}
PY=${PYTHON:-python}
DOCS=${DOCS:-docs/reference-runs}
N_TRAIN=${N_TRAIN:-300}; N_FRESH=${N_FRESH:-150}; EPOCHS=${EPOCHS:-12}; TAB_EPOCHS=${TAB_EPOCHS:-150}
SCALE=${SCALE:-1.0}  # frame size scale of the generated cohorts (smoke tests only)
mkdir -p "$WORK" "$DOCS"
cli() { "$PY" -m dicom_node.cli "$@"; }

# 1. cohorts: the training cohort (seed 7, as the earlier reference runs) and a fresh one (seed 8)
[ -f "$WORK/cohort/labels.csv" ] || cli synth --out "$WORK/cohort" --participants "$N_TRAIN" --seed 7 --image-scale "$SCALE" --oracle | tee "$WORK/oracle.txt"
[ -f "$WORK/fresh/labels.csv" ] || cli synth --out "$WORK/fresh" --participants "$N_FRESH" --seed 8 --image-scale "$SCALE" --oracle | tee "$WORK/oracle-fresh.txt"

write_cfg() {  # $1 file, $2 fov_cm
cat > "$1" <<TOML
# resnet10t 128 px, 12 epochs, nested selection + calibration (issue 13 reference run)
[node]
allow_any_calling_aet = true
[scoring]
enabled = false
[train]
backbone = "resnet10t"
input_size = 128
epochs = $EPOCHS
warmup_epochs = 1
batch_size = 16
lr = 1e-3
tabular_epochs = $TAB_EPOCHS
seed = 42
selection = "nested"
calibration = "auto"
fov_cm = $2
TOML
}

# 2. ROI-box crop (the paper's): image served, clinical, lab and fusion on the same folds
write_cfg "$WORK/box.toml" 0.0
[ -f "$WORK/model300-v2/model.json" ] || cli train --config "$WORK/box.toml" --archive "$WORK/cohort/dicom" --labels "$WORK/cohort/labels.csv" \
    --out "$WORK/model300-v2" --also clinical lab image+clinical+lab
# 3. physically scaled crop (6 cm field of view), image only
write_cfg "$WORK/fov.toml" 6.0
[ -f "$WORK/model300-v2-fov/model.json" ] || cli train --config "$WORK/fov.toml" --archive "$WORK/cohort/dicom" --labels "$WORK/cohort/labels.csv" \
    --out "$WORK/model300-v2-fov"

# 4. the promise: both served ensembles on the fresh cohort, at their stored thresholds
for m in model300-v2 model300-v2-fov; do
  cli evaluate --model "$WORK/$m" --archive "$WORK/fresh/dicom" --labels "$WORK/fresh/labels.csv" \
      --out "$WORK/$m/evaluation-seed8"
  rm -rf "${DOCS:?}/$m"; mkdir -p "$DOCS/$m"
  cp -r "$WORK/$m/model.json" "$WORK/$m/report.md" "$WORK/$m/report_files" "$DOCS/$m/"
  mkdir -p "$DOCS/$m/evaluation-seed8"
  cp "$WORK/$m/evaluation-seed8/"{evaluation.json,operating_point.md,report.md} "$DOCS/$m/evaluation-seed8/"
done
cp "$WORK/box.toml" "$DOCS/model300-v2/train.toml"; cp "$WORK/fov.toml" "$DOCS/model300-v2-fov/train.toml"

# 5. summary: OOF AUC gap to the oracle for both scalings
"$PY" - "$WORK" "$DOCS" <<'PYEOF'
import json, re, sys
from pathlib import Path
work, docs = Path(sys.argv[1]), Path(sys.argv[2])
oracle = re.search(r"oracle image-only AUC[^:]*: ([0-9.]+)", (work / "oracle.txt").read_text())
o = float(oracle.group(1)) if oracle else float("nan")
lines = ["# Reference run v2 (issue 13): both input scalings vs the generator's oracle\n",
         f"Oracle image-only AUC (latent muscle score, seed 7): {o:.3f}\n",
         "| run | combination | OOF AUC participant (95% CI) | gap to oracle | threshold | expected sens/spec | fresh cohort sens/spec | ECE CV / fresh |",
         "|---|---|---|---|---|---|---|---|"]
for m in ("model300-v2", "model300-v2-fov"):
    raw = json.loads((work / m / "model.json").read_text())
    ev = json.loads((work / m / "evaluation-seed8" / "evaluation.json").read_text())
    op = ev["operating_point"]; e = raw["decision"]["expected"]
    for combo, met in raw["cv_metrics"].items():
        a = met["participant"]["auc"]
        served = combo == raw["served_combination"]
        lines.append(f"| {m} | {combo} | {a['auc']:.3f} ({a['ci_low']:.3f}-{a['ci_high']:.3f}) | "
                     f"{o - a['auc']:+.3f} | " + (f"{raw['threshold']:.3f} | {e['sensitivity']:.3f}/{e['specificity']:.3f} | "
                     f"{op['observed']['sensitivity']:.3f}/{op['observed']['specificity']:.3f} | "
                     f"{e['ece']:.3f} / {op['observed']['ece']:.3f} |" if served else " | | | |"))
(docs / "model300-v2-summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
