#!/usr/bin/env bash
# The issue-12 segmenter reference run: 60 synthetic participants (seed 7, three vendor
# profiles), 3 participant-level folds, the [segmentation] defaults otherwise (MONAI UNet,
# 0.04 cm/px, 60 epochs, mirror averaging). About 30 min on 2 CPU cores with other work running.
#
#   docs/reference-runs/run_segmenter.sh [WORK_DIR]      (from the repository root)
#
# Copies the report, the held-out table and model.json (no weights) to
# docs/reference-runs/segmenter60.
set -euo pipefail
WORK=${1:-/tmp/dicom-node-segmenter}
PY=${PYTHON:-python}
DOCS=${DOCS:-docs/reference-runs}
mkdir -p "$WORK"
cli() { "$PY" -m dicom_node.cli "$@"; }
[ -f "$WORK/cohort60/labels.csv" ] || cli synth --out "$WORK/cohort60" --participants 60 --seed 7
cp "$DOCS/segmenter60/train.toml" "$WORK/seg.toml" 2>/dev/null || cat > "$WORK/seg.toml" <<'TOML'
[node]
allow_any_calling_aet = true
[scoring]
enabled = false
[segmentation]
n_folds = 3
epochs = 60
threads = 1
flip_average = true
TOML
cli train --config "$WORK/seg.toml" --task segmentation --archive "$WORK/cohort60/dicom" \
    --labels "$WORK/cohort60/labels.csv" --out "$WORK/segmenter60"
mkdir -p "$DOCS/segmenter60"
cp "$WORK/segmenter60/"{model.json,report.json,report.html,bland_altman.png,segmentation_oof.csv} "$DOCS/segmenter60/"
