"""Errors of the training library."""

from __future__ import annotations


class TrainingError(Exception):
    """Training data or settings do not allow a run (e.g. one class only, no usable studies)."""


class TrainConfigError(TrainingError):
    """A ``[train]`` setting is invalid; ``key`` is the name inside the section (e.g. ``folds``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"train.{key}: {message}")
