"""The ``dicom-node`` command line: one sub-command per job, heavy imports only where needed.

Each sub-command is implemented by a ``*_command(args, cfg) -> int`` function in the application
module that owns that job (the library commands live in :mod:`dicom_node.commands`, which turns
the namespace into typed calls); this file only declares the arguments and dispatches. Modules are
imported lazily so that ``echo``, ``push`` and ``studies`` start in about a second (importing
torch/monai takes 10+ seconds on a 2-core machine).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

from dicom_node.config import Config, config_from_dict, load_config
from dicom_node.errors import ConfigError, DicomNodeError

log = logging.getLogger(__name__)

# sub-command -> "module:function"; the function takes (args, cfg) and returns an exit code.
COMMANDS: dict[str, str] = {
    "serve": "dicom_node.service:serve_command",
    "studies": "dicom_node.service:studies_command",
    "echo": "dicom_node.scu:echo_command",
    "push": "dicom_node.scu:push_command",
    "synth": "dicom_node.commands.train:synth_command",
    "train": "dicom_node.commands.train:train_command",
    "evaluate": "dicom_node.commands.train:evaluate_command",
    "compare": "dicom_node.commands.train:compare_command",
    "score": "dicom_node.commands.score:score_command",
    "outbox": "dicom_node.delivery.sender:outbox_command",
    "resend": "dicom_node.delivery.sender:resend_command",
    "demo": "dicom_node.demo:demo_command",
}

# Commands that work without a config file (defaults are used when ./config.toml is absent).
_CONFIG_OPTIONAL = {"echo", "push", "synth", "score", "compare", "demo", "evaluate"}


def build_parser() -> argparse.ArgumentParser:
    """Declare every sub-command and its options."""
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="DICOM node that screens for sarcopenia from rectus femoris ultrasound "
        "(research use only).",
    )
    parser.add_argument("--log-level", default=None, help="override node.log_level")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=Path("config.toml"), help="config file")
        return p

    add("serve", "Run the C-STORE/C-ECHO listener, study completion, scoring worker and sender.")

    p = add("studies", "List studies with their completion, job and delivery state.")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("echo", "C-ECHO a DICOM peer (verification SCU).")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", default=None, help="our calling AE title (default node.ae_title)")
    p.add_argument("--aec", default="ANY-SCP", help="called AE title")

    p = add("push", "Send a folder (or files) of DICOM objects with C-STORE, like a modality.")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--aet", default="PYNETDICOM", help="our calling AE title")
    p.add_argument("--aec", default=None, help="called AE title (default node.ae_title)")

    p = add("synth",
            "Generate a synthetic multi-vendor RF-ultrasound cohort (DICOM + SEG + labels).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--participants", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vendors", nargs="+", default=None,
                   help="vendor profiles: supersonic, mindray, samsung (default: all three)")
    p.add_argument("--follow-up", action="store_true", help="add a follow-up study per participant")
    p.add_argument("--oracle", action="store_true", help="print the image-only oracle AUC")
    p.add_argument("--image-scale", type=float, default=1.0,
                   help="scale every frame size (physical depth kept; 0.5 for quick tests)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs)")
    p.add_argument("--non-muscle", type=int, default=0, metavar="N",
                   help="also write N non-muscle US objects (colour Doppler, sector, fluid, "
                        "spectral) under OUT/nonmuscle/ for the input gate")

    p = add("train", "Train the fold ensemble on an archive or DICOM folder (paper's protocol).")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                   help="segmentation: the automatic RF ROI model from the archive's SEGs "
                        "([segmentation] settings)")
    p.add_argument("--archive", type=Path, default=None,
                   help="node data dir (index.sqlite) or a folder of DICOM (default node.data_dir)")
    p.add_argument("--labels", type=Path, default=None,
                   help="CSV keyed by PatientID or StudyUID (required for classification; for "
                        "segmentation optional, gives participant ids for the folds)")
    p.add_argument("--out", type=Path, default=None,
                   help="model dir (default train.output_dir; segmentation: "
                        "scoring.segmentation_model_dir, else runs/segmenter)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--backbones", nargs="+", default=None, metavar="NAME",
                   help="train each backbone under the same folds into OUT/<name> and write "
                        "OUT/backbones.md (AUCs, paired DeLong P values)")
    p.add_argument("--modalities", nargs="+", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    p.add_argument("--also", nargs="+", default=None, metavar="MODS",
                   help="extra modality combinations for the report, e.g. clinical lab "
                        "image+clinical+lab (same folds; the served model is train.modalities)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the per-epoch checkpoints (OUT.work/) after a successful run")

    p = add("evaluate", "Validate a trained model on another archive (external validation).")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--archive", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)

    p = add("compare", "DeLong test between two runs' out-of-fold predictions.")
    p.add_argument("run_a", type=Path, help="model dir with oof.csv (or the csv)")
    p.add_argument("run_b", type=Path, help="model dir with oof.csv (or the csv)")
    p.add_argument("--a-combination", default=None, help="modality combination of run A, "
                   "e.g. image or image+clinical+lab (default: every combination in both)")
    p.add_argument("--b-combination", default=None, help="modality combination of run B")
    p.add_argument("--level", choices=("participant", "study", "image"), default="participant")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("score", "Score DICOM files/folders offline; writes SR, heat maps and a summary.")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None, help="model dir (default scoring.model_dir)")

    p = add("outbox", "Show results waiting for delivery (and their last error).")
    p.add_argument("--json", action="store_true", help="machine-readable output (epoch times)")

    p = add("resend", "Retry every undelivered result now.")
    p.add_argument("--id", type=int, default=None, help="only this outbox item")

    p = add("demo", "End-to-end demo on synthetic data: generate, train, serve, push, read back.")
    p.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: temp)")
    p.add_argument("--participants", type=int, default=None, help="cohort size (45)")
    p.add_argument("--held-out", type=int, default=None, help="studies pushed to the node (6)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (12)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (96)")
    p.add_argument("--backbone", default=None, help="timm backbone (resnet10t)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for results at the PACS (300)")
    p.add_argument("--no-orthanc", action="store_true",
                   help="use a pynetdicom storage SCP as the PACS even if Orthanc is installed")
    return parser


def _load(args: argparse.Namespace) -> Config:
    path: Path = args.config
    if not path.exists() and args.command in _CONFIG_OPTIONAL and path == Path("config.toml"):
        return config_from_dict(
            {"node": {"allow_any_calling_aet": True}, "scoring": {"enabled": False}}
        )
    return load_config(path)


def _resolve(target: str) -> Callable[[argparse.Namespace, Config], int]:
    module_name, func = target.split(":")
    # the targets are the ``*_command`` functions named in this module's dispatch table
    return cast("Callable[[argparse.Namespace, Config], int]",
                getattr(importlib.import_module(module_name), func))


def setup_logging(level: str, fmt: str = "text") -> None:
    """One format for every process; see :mod:`dicom_node.ops.logs` (no patient data, one line)."""
    from dicom_node.ops.logs import setup_logging as _setup

    _setup(level, fmt)


def _add_ops_options(parser: argparse.ArgumentParser) -> None:
    """Process-wide options that are not a sub-command's business (version, log format)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("dicom-node")
    except PackageNotFoundError:  # running from a source tree without an install
        ver = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"dicom-node {ver}")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text (default) or json: one object per line with study/job ids")


def _usage_error(args: argparse.Namespace, cfg: Config | None) -> str | None:
    """The first user mistake in the arguments or the loaded config, as one line (or None)."""
    from dicom_node.config import validate_ae_title
    from dicom_node.ops.logs import LEVELS

    level = getattr(args, "log_level", None)
    if level is not None and level.upper() not in LEVELS:
        return f"--log-level {level!r} is not one of {', '.join(LEVELS)}"
    port = getattr(args, "port", None)
    if isinstance(port, int) and not 1 <= port <= 65535:
        return f"port {port} is not a TCP port (1-65535)"
    for opt in ("aet", "aec"):
        value = getattr(args, opt, None)
        if value is not None:
            try:
                validate_ae_title(value, f"--{opt}")
            except DicomNodeError:
                return f"--{opt} {value!r} is not an AE title (1-16 printable ASCII, no backslash)"
    if cfg is not None and cfg.node.data_dir.exists() and not cfg.node.data_dir.is_dir():
        return f"config key 'node.data_dir': {cfg.node.data_dir} exists and is not a directory"
    return None


def _describe_os_error(exc: OSError, args: argparse.Namespace, cfg: Config) -> str:
    """One line for an OS error that reached the CLI: which address or path, and why."""
    if exc.errno == errno.EADDRINUSE and args.command == "serve":
        where = getattr(exc, "address", None) or f"{cfg.node.host}:{cfg.node.port}"
        return f"cannot listen on {where}: address already in use (is another node running?)"
    what = exc.strerror or str(exc)
    return f"{exc.filename}: {what}" if exc.filename else what


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script.

    Exit codes: 0 success, 1 a runtime failure (e.g. a peer refused), 2 a user mistake (bad
    argument or config), 130 interrupted. Every failure ends with exactly one line naming it.
    """
    from dicom_node.errors import USER_ERRORS as user_errors
    parser = build_parser()
    _add_ops_options(parser)
    args = parser.parse_args(argv)
    problem = _usage_error(args, None)
    cfg: Config | None = None
    if problem is None:
        try:
            cfg = _load(args)
        except DicomNodeError as exc:
            problem = str(exc)
        except OSError as exc:  # e.g. --config names a directory
            problem = f"cannot read config file {args.config}: {exc.strerror or exc}"
    if problem is None:
        problem = _usage_error(args, cfg)
    if problem is not None or cfg is None:
        print(f"dicom-node {args.command}: {problem}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or cfg.node.log_level, args.log_format)
    try:
        return int(_resolve(COMMANDS[args.command])(args, cfg))
    except ConfigError as exc:  # found late (e.g. a model dir named by config does not exist)
        log.error("dicom-node %s: %s", args.command, exc)
        return 2
    except user_errors as exc:
        log.error("dicom-node %s: %s", args.command, exc)
        return 1
    except OSError as exc:
        log.error("dicom-node %s: %s", args.command, _describe_os_error(exc, args, cfg))
        return 2 if exc.errno == errno.EADDRINUSE else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
