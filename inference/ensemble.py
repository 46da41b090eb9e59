"""The fold ensemble: every fold model scores every image of a study in one batched call.

Per image the probability is the mean over folds and the spread (population standard deviation
over folds) is kept as an uncertainty; a study's probability is the mean, max or median of its
images. Scores and Grad-CAM come out of the same forward (see :mod:`inference.cam`).

Backends: "eager" (default) runs the fold models in turn; "compile" (torch.compile) and "onnx"
(ONNX Runtime, all folds in one graph, heat maps included via the closed-form Grad-CAM) are used
only when they reproduce eager probabilities to max |dp| < 1e-4 on a check batch at load time,
otherwise the ensemble falls back to eager and says so in the log.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from inference.cam import (
    decision_logit,
    gap_cam_from_features,
    gap_head,
    gradcam_forward,
    normalize_cams,
    resolve_target_layer,
    supports_gap_cam,
)
from inference.errors import InferenceConfigError

log = logging.getLogger(__name__)

EQUIVALENCE_TOLERANCE = 1e-4  # max |delta p| for an alternative backend to be used
MAX_BATCH = 32  # images per call; bounds memory for long cine loops with frame_policy "all"


@dataclass
class EnsembleOutput:
    """Raw ensemble output for a batch of images.

    Attributes:
        fold_probabilities: (folds, images) sigmoid probabilities.
        cams: (images, h, w) Grad-CAM averaged over folds, 0..1; None without CAM.
    """

    fold_probabilities: np.ndarray
    cams: np.ndarray | None = None

    @property
    def probability(self) -> np.ndarray:
        """Per-image probability: mean over folds."""
        return self.fold_probabilities.mean(axis=0)

    @property
    def spread(self) -> np.ndarray:
        """Per-image uncertainty: population standard deviation over folds."""
        return self.fold_probabilities.std(axis=0)


@dataclass(frozen=True)
class FoldCalibration:
    """Per-fold probability calibrators, as stored in model.json's ``calibration`` table.

    Each fold model's sigmoid output is mapped to a calibrated probability by its own calibrator
    (fitted on that fold's inner-validation participants), and the node averages the *calibrated*
    probabilities over folds: the threshold in model.json is on this scale.

    Attributes:
        method: "platt" (p' = sigmoid(a * logit(p) + b)), "isotonic" (piecewise-linear
            interpolation through ``x``/``y`` breakpoints, clipped at the ends) or "none".
        folds: one parameter dict per fold ({"a", "b"} or {"x", "y"}).
    """

    method: str = "none"
    folds: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, raw: Any, n_folds: int) -> FoldCalibration:
        """Parse and check ``model.json``'s ``calibration`` (None or method "none": identity)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError("calibration must be an object or null")
        method = raw.get("method", "none")
        if method == "none":
            return cls()
        if method not in ("platt", "isotonic"):
            raise ValueError(f"calibration.method {method!r} is not platt, isotonic or none")
        folds = raw.get("folds")
        if not isinstance(folds, list) or len(folds) != n_folds:
            raise ValueError(f"calibration.folds must list one calibrator per fold ({n_folds})")
        out = []
        for k, f in enumerate(folds):
            if not isinstance(f, dict):
                raise ValueError(f"calibration.folds[{k}] must be an object")
            if method == "platt":
                a, b = f.get("a"), f.get("b")
                if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in (a, b)):
                    raise ValueError(f"calibration.folds[{k}] needs finite numbers a and b")
                out.append({"a": float(a), "b": float(b)})
            else:
                x = np.asarray(f.get("x", []), dtype=np.float64)
                y = np.asarray(f.get("y", []), dtype=np.float64)
                if x.size < 1 or x.shape != y.shape or np.any(np.diff(x) < 0) \
                        or np.any((y < 0) | (y > 1)):
                    raise ValueError(f"calibration.folds[{k}] needs increasing x and y in 0..1 "
                                     "of the same length")
                out.append({"x": x.tolist(), "y": y.tolist()})
        return cls(method, tuple(out))

    def apply(self, fold_probabilities: np.ndarray) -> np.ndarray:
        """(folds, images) raw probabilities -> calibrated probabilities, same shape."""
        p = np.asarray(fold_probabilities, dtype=np.float64)
        if self.method == "none":
            return p
        if p.shape[0] != len(self.folds):
            raise ValueError(f"{p.shape[0]} fold outputs for {len(self.folds)} calibrators")
        return np.stack([apply_calibrator(self.method, f, row)
                         for f, row in zip(self.folds, p, strict=True)])


def apply_calibrator(method: str, params: dict[str, Any], p: np.ndarray) -> np.ndarray:
    """One fold's calibrator on raw probabilities (training fits, serving applies: one formula)."""
    p = np.asarray(p, dtype=np.float64)
    if method == "platt":
        q = np.clip(p, 1e-7, 1 - 1e-7)
        z = params["a"] * np.log(q / (1 - q)) + params["b"]
        return 1.0 / (1.0 + np.exp(-z))
    if method == "isotonic":
        return np.interp(p, params["x"], params["y"])
    return p


def study_probability(image_probabilities: Sequence[float], rule: str) -> float:
    """Aggregate image probabilities into the study probability by ``rule`` (mean/max/median)."""
    values = np.asarray(image_probabilities, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no image probabilities to aggregate")
    if rule == "mean":
        return float(values.mean())
    if rule == "max":
        return float(values.max())
    if rule == "median":
        return float(np.median(values))
    raise ValueError(f"unknown study rule {rule!r} (mean, max, median)")


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU; "cuda" without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceConfigError("scoring.device", "'cuda' but no CUDA device is available")
    return torch.device(name)


class _FoldGraph(nn.Module):
    """All folds as one module: (images) -> (fold logits (F, B), fold CAMs (F, B, h, w)).

    Uses the closed-form Grad-CAM, so it has no autograd and can be compiled or exported.
    """

    def __init__(self, models: Sequence[nn.Module], with_cam: bool) -> None:
        super().__init__()
        self.folds = nn.ModuleList(models)
        self.with_cam = with_cam

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, cams = [], []
        for model in self.folds:
            gh = gap_head(model)
            assert gh is not None
            features = gh.features(x)
            if self.with_cam:
                out, cam = gap_cam_from_features(gh, features)
                cams.append(cam)
            else:
                out = gh.head(features)
            logits.append(decision_logit(out))
        stacked_cams = torch.stack(cams) if cams else torch.zeros(len(logits), x.shape[0], 1, 1)
        return torch.stack(logits), stacked_cams


class FoldEnsemble:
    """Scores batches of preprocessed images with every fold model (models loaded once).

    Args:
        models: the fold models (eval mode); their parameters are frozen here.
        device: "auto", "cpu" or "cuda".
        threads: torch CPU threads (process-wide setting, from ``scoring.torch_threads``).
        backend: "eager", "compile" or "onnx".
        cam_layer: Grad-CAM target module name or "auto" (last feature stage).
        cam_method: "torchcam" (torchcam GradCAM, backward through the head only) or "gap"
            (closed-form last-stage Grad-CAM; needs a GAP [-> LayerNorm] -> Linear head and
            cam_layer "auto"); "gap" falls back to torchcam when the head does not qualify.
        input_shape: (C, S, S) of one preprocessed image, for checks and export.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        device: str = "auto",
        threads: int = 2,
        backend: str = "eager",
        cam_layer: str = "auto",
        cam_method: str = "torchcam",
        input_shape: tuple[int, int, int] = (3, 224, 224),
    ) -> None:
        if not models:
            raise ValueError("the ensemble needs at least one fold model")
        torch.set_num_threads(threads)
        self.threads = threads
        self.device = resolve_device(device)
        self.input_shape = tuple(input_shape)
        self.models: list[nn.Module] = []
        for m in models:
            m.eval()
            m.requires_grad_(False)  # parameter gradients never computed (3.2x measured)
            self.models.append(m.to(self.device, memory_format=torch.channels_last))
        self.cam_layers = [resolve_target_layer(m, cam_layer, self.input_shape) for m in self.models]
        self._gap_heads = [gap_head(m) for m in self.models]
        gap_ok = all(supports_gap_cam(m) for m in self.models) and all(
            gh is not None and gh.layer == layer for gh, layer in zip(self._gap_heads, self.cam_layers)
        )
        if cam_method == "gap" and not gap_ok:
            log.warning("cam_method 'gap' needs a GAP->Linear head and the last stage; using torchcam")
        self.cam_method = "gap" if cam_method == "gap" and gap_ok else "torchcam"
        self._gap_ok = gap_ok
        self.backend = "eager"
        self._runner: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if backend != "eager":
            self._setup_backend(backend)
        log.info(
            "fold ensemble ready: %d folds on %s, backend %s, CAM %s at %s",
            len(self.models), self.device, self.backend, self.cam_method, self.cam_layers[0],
        )

    # -- public ----------------------------------------------------------------------------

    def predict(self, images: Tensor, *, cam: bool = False) -> EnsembleOutput:
        """Score a stack of preprocessed images (B, C, S, S) with every fold.

        Each fold model sees the whole stack in one call (chunked only beyond ``MAX_BATCH``).
        """
        if images.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images.shape)}")
        probs, cams = [], []
        for start in range(0, images.shape[0], MAX_BATCH):
            p, c = self._predict_chunk(images[start : start + MAX_BATCH], cam)
            probs.append(p)
            if c is not None:
                cams.append(c)
        return EnsembleOutput(
            fold_probabilities=np.concatenate(probs, axis=1).astype(np.float64),
            cams=np.concatenate(cams, axis=0) if cam else None,
        )

    def close(self) -> None:
        """Remove the exported ONNX graph, if any."""
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # -- internals ---------------------------------------------------------------------------

    def _prepare(self, x: Tensor) -> Tensor:
        return x.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)

    def _predict_chunk(self, x: Tensor, cam: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self._runner is not None and (not cam or self._gap_ok):
            logits, fold_cams = self._runner(x)
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            if not cam:
                return probs, None
            return probs, self._fold_mean(fold_cams).cpu().numpy()
        return self._eager(x, cam)

    def _eager(self, x: Tensor, cam: bool) -> tuple[np.ndarray, np.ndarray | None]:
        x = self._prepare(x)
        logits, fold_cams = [], []
        for model, layer, gh in zip(self.models, self.cam_layers, self._gap_heads):
            if not cam:
                with torch.inference_mode():
                    out = model(x)
            elif self.cam_method == "gap" and gh is not None:
                with torch.inference_mode():
                    out, c = gap_cam_from_features(gh, gh.features(x))
                fold_cams.append(c)
            else:
                out, c = gradcam_forward(model, x, layer)
                fold_cams.append(c)
            logits.append(decision_logit(out).float())
        probs = torch.sigmoid(torch.stack(logits)).cpu().numpy()
        if not cam:
            return probs, None
        return probs, self._fold_mean(torch.stack(fold_cams)).cpu().numpy()

    @staticmethod
    def _fold_mean(fold_cams: Tensor) -> Tensor:
        """Average the per-fold normalised maps, then rescale to 0..1 for display."""
        return normalize_cams(fold_cams.float().mean(dim=0))

    def _setup_backend(self, backend: str) -> None:
        if not self._gap_ok:
            log.warning(
                "backend %r needs a GAP->Linear head (closed-form Grad-CAM); staying eager", backend
            )
            return
        try:
            runner = self._build_compiled() if backend == "compile" else self._build_onnx()
        except Exception as exc:  # noqa: BLE001 - any export/compile failure means: stay eager
            log.warning("backend %r could not be set up (%s); staying eager", backend, exc)
            self.close()
            return
        gen = torch.Generator().manual_seed(1234)
        check = torch.rand((2, *self.input_shape), generator=gen)
        reference, _ = self._eager(check, cam=False)
        logits, _ = runner(check)
        delta = float(np.abs(torch.sigmoid(logits.float()).cpu().numpy() - reference).max())
        if delta >= EQUIVALENCE_TOLERANCE:
            log.warning("backend %r differs from eager by %.2e >= %.0e; staying eager",
                        backend, delta, EQUIVALENCE_TOLERANCE)
            self.close()
            return
        log.info("backend %r matches eager (max |dp| = %.1e)", backend, delta)
        self.backend = backend
        self.cam_method = "gap"  # the compiled/exported graph computes the closed-form Grad-CAM
        self._runner = runner
        self.max_abs_delta = delta

    def _build_compiled(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        graph = _FoldGraph(self.models, with_cam=True).eval()
        compiled = torch.compile(graph, dynamic=True)

        def run(x: Tensor) -> tuple[Tensor, Tensor]:
            with torch.inference_mode():
                return compiled(self._prepare(x))

        return run

    def _build_onnx(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        import onnxruntime as ort

        self._tmpdir = tempfile.TemporaryDirectory(prefix="dicom-node-onnx-")
        path = Path(self._tmpdir.name) / "ensemble.onnx"
        graph = _FoldGraph([m.cpu() for m in self.models], with_cam=True).eval()
        example = torch.rand((2, *self.input_shape))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks (constants here)
            torch.onnx.export(
                graph, (example,), str(path), dynamo=False, input_names=["images"],
                output_names=["logits", "cams"], opset_version=17,
                dynamic_axes={"images": {0: "batch"}, "logits": {1: "batch"}, "cams": {1: "batch"}},
            )
        for m in self.models:
            m.to(self.device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # no busy-waiting after a run: on a small CPU it would steal the cores the rest of the
        # study (CAM resize, SR/SC build) and the receiving node need
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(path), opts, providers=providers)

        def run(x: Tensor) -> tuple[Tensor, Tensor]:
            feed: dict[str, Any] = {"images": x.detach().cpu().float().contiguous().numpy()}
            logits, cams = session.run(["logits", "cams"], feed)
            return torch.from_numpy(logits), torch.from_numpy(cams)

        return run
