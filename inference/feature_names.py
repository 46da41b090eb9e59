"""The paper's tabular inputs, in their fixed order (Chen et al. 2025).

One home for these names: the synthetic generator writes them as labels.csv columns, the
feature preprocessor reads them, and the fusion model sizes its MLP branches from them. Kept
free of heavy imports so that the generator does not pull in torch.
"""

from __future__ import annotations

# Clinical branch (8-D): the order is part of model.json's feature scaling.
CLINICAL_FEATURES: tuple[str, ...] = (
    "diabetes", "osteoporosis", "age", "sex", "height_cm", "weight_kg", "bmi",
    "calf_circumference_cm",
)
# Laboratory branch (14-D).
LAB_FEATURES: tuple[str, ...] = (
    "tc", "tg", "hdl", "ldl", "hba1c", "albumin", "hemoglobin", "vitd_1_25", "osteocalcin",
    "ft3", "ft4", "tt3", "tt4", "tsh",
)
