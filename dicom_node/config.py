"""Load ``config.toml`` once into frozen, validated dataclasses.

Every section of the TOML file has one dataclass. The node's own sections are defined here; the
libraries own theirs (``[reader]``/``[scoring]``: :mod:`inference.config`, ``[train]``:
:mod:`training.config`) and this module composes them. Values are checked when loaded, so a bad
AE title, port, path or duration stops the process at start-up with a message naming the key,
instead of failing later in the middle of an association. Sub-configs are passed down as
arguments; nothing here is a module global.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dicom_node.errors import ConfigError
from inference.config import (
    Backend,
    CamMethod,
    DeviceName,
    FramePolicy,
    ReaderConfig,
    RegionPolicy,
    ScoringConfig,
    StudyRule,
)
from inference.gate import GateConfig, gate_config_from_dict
from training.config import Modality, Target, TrainConfig, check_train_config
from training.errors import TrainConfigError
from training.segmentation_config import SegTrainConfig

# Re-exported so ``from dicom_node.config import TrainConfig`` (etc.) keeps working.
__all__ = [
    "Backend", "CamMethod", "CompletionConfig", "Config", "DeliveryConfig", "DestinationConfig",
    "DeviceName", "FramePolicy", "GateConfig", "HttpConfig", "Modality", "NodeConfig",
    "OnMissingSeg", "ReaderConfig",
    "RegionPolicy", "ResultsConfig", "ScoringConfig", "StudyRule", "TLSConfig", "Target",
    "TrainConfig", "config_from_dict", "load_config", "validate_ae_title",
]

# DICOM PS3.5 Table 6.2-1: AE is up to 16 characters of the default repertoire without backslash
# or control characters; leading/trailing spaces are not significant and an all-space AE is invalid.
_AE_TITLE_RE = re.compile(r"^[\x20-\x5B\x5D-\x7E]{1,16}$")

OnMissingSeg = Literal["score-whole-region", "hold", "reject", "auto"]


def validate_ae_title(value: Any, key: str) -> str:
    """Return the AE title stripped of padding, or raise naming ``key``."""
    if not isinstance(value, str) or not _AE_TITLE_RE.match(value) or not value.strip():
        raise ConfigError(
            key, f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)"
        )
    return value.strip()


@dataclass(frozen=True)
class TLSConfig:
    """Optional TLS for the listener (or for one destination)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class NodeConfig:
    """The receiving node: who we are, where we listen and who may call us."""

    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: Path = Path("./node-data")
    allowed_calling_aets: tuple[str, ...] = ()
    allow_any_calling_aet: bool = False
    require_called_aet: bool = True
    max_pdu: int = 131072
    tcp_nodelay: bool = True
    disk_reserve_mb: int = 1024
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 60.0
    max_associations: int = 16
    max_decoded_mb: int = 512
    pending_timeout_seconds: float = 5.0
    max_connections_per_peer: int = 8
    log_level: str = "INFO"
    tls: TLSConfig = field(default_factory=TLSConfig)

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def failed_dir(self) -> Path:
        return self.data_dir / "failed"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "index.sqlite"


@dataclass(frozen=True)
class CompletionConfig:
    """When a study counts as complete (quiet period, ceiling, SEG policy).

    ``on_missing_seg`` None resolves when the config is loaded: ``auto`` (segment the images no
    SEG covers) when ``scoring.segmentation_model_dir`` is set, else ``score-whole-region``.
    ``seg_wait_seconds``: with ``auto``, how long (from the start of the receiving episode) a
    quiet study waits for a human SEG before the node segments it; the other policies wait until
    ``max_wait_seconds``.
    """

    idle_seconds: float = 60.0
    max_wait_seconds: float = 900.0
    require_seg: bool = True
    on_missing_seg: OnMissingSeg | None = None
    seg_wait_seconds: float = 120.0
    poll_seconds: float = 2.0


@dataclass(frozen=True)
class WorkerConfig:
    """The job worker that scores complete studies."""

    enabled: bool = True
    max_attempts: int = 3
    retry_base_seconds: float = 30.0
    poll_seconds: float = 1.0
    processes: int = 1
    max_memory_mb: int = 3072
    max_rss_mb: int = 0
    job_timeout_seconds: float = 600.0


@dataclass(frozen=True)
class ResultsConfig:
    """What the node writes back: the algorithm's identity and the SR/SC series."""

    manufacturer: str = "dicom-node project"
    algorithm_name: str = "dicom-node SARCO screening"
    institution_name: str = ""
    sr_series_description: str = "Sarcopenia screening SR (research use)"
    sc_series_description: str = "Sarcopenia Grad-CAM (research use)"
    sr_series_number: int = 9001
    sc_series_number: int = 9002
    seg_series_number: int = 9003  # the AI SEGs of automatic ROIs
    burn_in_text: str = "RESEARCH USE ONLY - not for diagnosis"
    heatmap_jpeg: bool = False
    # a study with no image the model may score: send nothing, or an SR saying "not assessable"
    not_assessable: Literal["none", "sr"] = "none"


DESTINATION_KINDS = ("dimse", "stowrs")
StowAuth = Literal["none", "basic", "bearer"]
# keys that belong to one kind only: setting one on the other kind is a mistake worth naming
_DIMSE_ONLY = ("ae_title", "host", "port", "storage_commitment",
               "storage_commitment_timeout_seconds", "storage_commitment_wait_seconds")
_STOWRS_ONLY = ("url", "auth", "username", "password", "token", "secret_file", "secret_env",
                "tls_verify", "ca_file")


@dataclass(frozen=True)
class DestinationConfig:
    """One place results are sent to: a PACS over DIMSE C-STORE or a DICOMweb STOW-RS service.

    Which keys apply depends on ``kind``; :func:`_validate_destination` checks them per kind so a
    ``stowrs`` entry without ``url`` (or a ``dimse`` one without ``host``) stops at load time.
    Secrets (``password``/``token``) may come from ``secret_file`` or the environment variable
    named by ``secret_env`` so config.toml need not hold them; they never appear in ``repr``.
    """

    name: str
    # which dicom_node.delivery implementation sends to it
    kind: str = "dimse"
    # dimse
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: TLSConfig = field(default_factory=TLSConfig)
    storage_commitment: bool = False
    # how long a stored item may wait for the PACS's N-EVENT-REPORT before it is sent again
    storage_commitment_timeout_seconds: float = 3600.0
    # how long the sending association stays open for a report on that same association (0: none;
    # most PACS, Orthanc included, report on a new association to the listener)
    storage_commitment_wait_seconds: float = 0.0
    # stowrs
    url: str = ""
    auth: StowAuth = "none"
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    secret_file: Path | None = None
    secret_env: str = ""
    tls_verify: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    """Retry policy for sending results: exponential backoff with jitter up to a horizon."""

    retry_initial_seconds: float = 30.0
    retry_max_seconds: float = 900.0
    retry_horizon_hours: float = 72.0
    jitter_fraction: float = 0.2
    poll_seconds: float = 2.0
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class HttpConfig:
    """The status server inside ``serve``: /healthz, /readyz, /metrics and a read-only page."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""


@dataclass(frozen=True)
class Config:
    """The whole node configuration, loaded once at start-up."""

    node: NodeConfig = field(default_factory=NodeConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    segmentation: SegTrainConfig = field(default_factory=SegTrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    source_path: Path | None = None


# --------------------------------------------------------------------------------------------
# Generic TOML -> dataclass conversion with key-named errors
# --------------------------------------------------------------------------------------------


def _convert(value: Any, tp: Any, key: str, base_dir: Path) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple,) and args:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        inner = args[0]
        return tuple(_convert(v, inner, f"{key}[{i}]", base_dir) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {type(value).__name__}")
        return dict(value)
    if args and type(None) in args:  # Optional[X]
        if value is None or value == "":
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key, base_dir)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {type(value).__name__}")
        return _build(tp, value, key, base_dir)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a non-empty path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    return value


def _build(cls: Any, table: dict[str, Any], prefix: str, base_dir: Path) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, "unknown key (check spelling; see config.toml for all keys)")
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key, base_dir)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a required field is missing, a range check failed
        raise ConfigError(prefix or "<root>", str(exc)) from None


def _check_port(port: int, key: str) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"{port} is not a TCP port (1-65535)")


def _check_positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"{value} must be {'>= 0' if allow_zero else '> 0'}")


def _validate(cfg: Config) -> Config:
    """Cross-field checks; returns a copy with normalised AE titles."""
    node = cfg.node
    ae = validate_ae_title(node.ae_title, "node.ae_title")
    callers = tuple(
        validate_ae_title(a, f"node.allowed_calling_aets[{i}]")
        for i, a in enumerate(node.allowed_calling_aets)
    )
    _check_port(node.port, "node.port")
    if not 4096 <= node.max_pdu <= 2**32 - 1 and node.max_pdu != 0:
        raise ConfigError("node.max_pdu", f"{node.max_pdu} is outside 4096..4294967295 (or 0)")
    _check_positive(node.disk_reserve_mb, "node.disk_reserve_mb", allow_zero=True)
    for k in ("acse_timeout_seconds", "dimse_timeout_seconds", "network_timeout_seconds"):
        _check_positive(getattr(node, k), f"node.{k}")
    if node.max_associations < 1:
        raise ConfigError("node.max_associations", "must be >= 1")
    _check_positive(node.max_decoded_mb, "node.max_decoded_mb")
    _check_positive(node.pending_timeout_seconds, "node.pending_timeout_seconds")
    if node.max_connections_per_peer < 1:
        raise ConfigError("node.max_connections_per_peer", "must be >= 1")
    if node.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("node.log_level", f"{node.log_level!r} is not DEBUG/INFO/WARNING/ERROR")
    if not callers and not node.allow_any_calling_aet:
        raise ConfigError(
            "node.allowed_calling_aets",
            "is empty: list the modalities' AE titles or set allow_any_calling_aet = true",
        )
    _check_tls(node.tls, "node.tls")
    c = cfg.completion
    _check_positive(c.idle_seconds, "completion.idle_seconds")
    _check_positive(c.max_wait_seconds, "completion.max_wait_seconds")
    _check_positive(c.poll_seconds, "completion.poll_seconds")
    if c.max_wait_seconds < c.idle_seconds:
        raise ConfigError("completion.max_wait_seconds", "must be >= completion.idle_seconds")
    _check_positive(c.seg_wait_seconds, "completion.seg_wait_seconds", allow_zero=True)
    seg_model = cfg.scoring.segmentation_model_dir
    on_missing = c.on_missing_seg or ("auto" if seg_model is not None else "score-whole-region")
    if on_missing == "auto" and seg_model is None and cfg.scoring.enabled:
        raise ConfigError("completion.on_missing_seg",
                          "'auto' needs scoring.segmentation_model_dir (a model trained with "
                          "`dicom-node train --task segmentation`)")
    if cfg.worker.max_attempts < 1:
        raise ConfigError("worker.max_attempts", "must be >= 1")
    if cfg.worker.processes < 1:
        raise ConfigError("worker.processes", "must be >= 1")
    for key in ("max_memory_mb", "max_rss_mb", "job_timeout_seconds"):
        if getattr(cfg.worker, key) < 0:
            raise ConfigError(f"worker.{key}", "must be >= 0 (0 = no limit)")
    s = cfg.scoring
    if s.enabled and s.model_dir is None:
        raise ConfigError(
            "scoring.model_dir", "is required when scoring.enabled = true (or set enabled = false)"
        )
    if s.torch_threads < 1:
        raise ConfigError("scoring.torch_threads", "must be >= 1")
    dests = []
    names: set[str] = set()
    for i, d in enumerate(cfg.destinations):
        key = f"destinations[{i}]"
        if d.name in names:
            raise ConfigError(f"{key}.name", f"duplicate destination name {d.name!r}")
        names.add(d.name)
        dests.append(_validate_destination(d, key))
    if not 0 <= cfg.http.port <= 65535:  # 0: any free port (tests)
        raise ConfigError("http.port", f"{cfg.http.port} is not a TCP port (0-65535)")
    dl = cfg.delivery
    _check_positive(dl.retry_initial_seconds, "delivery.retry_initial_seconds")
    _check_positive(dl.retry_max_seconds, "delivery.retry_max_seconds")
    _check_positive(dl.retry_horizon_hours, "delivery.retry_horizon_hours")
    if not 0 <= dl.jitter_fraction < 1:
        raise ConfigError("delivery.jitter_fraction", "must be in [0, 1)")
    try:
        check_train_config(cfg.train)
    except TrainConfigError as exc:
        raise ConfigError(f"train.{exc.key}", exc.message) from None
    return dataclasses.replace(
        cfg,
        node=dataclasses.replace(node, ae_title=ae, allowed_calling_aets=callers),
        completion=dataclasses.replace(c, on_missing_seg=on_missing),
        destinations=tuple(dests),
    )


def _validate_destination(d: DestinationConfig, key: str) -> DestinationConfig:
    """Per-kind checks of one ``[[destinations]]`` entry; returns it normalised (secret read)."""
    if d.kind not in DESTINATION_KINDS:
        raise ConfigError(f"{key}.kind",
                          f"unknown kind {d.kind!r} (known: {', '.join(DESTINATION_KINDS)})")
    default = DestinationConfig(name=d.name)
    other = _STOWRS_ONLY if d.kind == "dimse" else _DIMSE_ONLY
    for k in other:
        if k != "tls" and getattr(d, k) != getattr(default, k):
            raise ConfigError(f"{key}.{k}", f"does not apply to kind = {d.kind!r}")
    if d.kind == "dimse":
        if not d.ae_title:
            raise ConfigError(f"{key}.ae_title", "is required for kind = 'dimse'")
        if not d.host:
            raise ConfigError(f"{key}.host", "is required for kind = 'dimse'")
        if not d.port:
            raise ConfigError(f"{key}.port", "is required for kind = 'dimse'")
        _check_port(d.port, f"{key}.port")
        _check_tls(d.tls, f"{key}.tls", server=False)
        _check_positive(d.storage_commitment_timeout_seconds,
                        f"{key}.storage_commitment_timeout_seconds")
        _check_positive(d.storage_commitment_wait_seconds, f"{key}.storage_commitment_wait_seconds",
                        allow_zero=True)
        return dataclasses.replace(d, ae_title=validate_ae_title(d.ae_title, f"{key}.ae_title"))
    # stowrs
    if d.tls != default.tls:
        raise ConfigError(f"{key}.tls",
                          "does not apply to kind = 'stowrs' (use tls_verify, ca_file)")
    if not d.url:
        raise ConfigError(f"{key}.url", "is required for kind = 'stowrs' (the studies endpoint, "
                          "e.g. https://pacs/dicom-web/studies)")
    if not re.match(r"^https?://[^/\s]+", d.url):
        raise ConfigError(f"{key}.url", f"{d.url!r} is not an http:// or https:// URL")
    if d.ca_file is not None and not Path(d.ca_file).is_file():
        raise ConfigError(f"{key}.ca_file", f"file not found: {d.ca_file}")
    secret = _read_secret(d, key)
    if d.auth == "none":
        if d.username or secret:
            raise ConfigError(f"{key}.auth", "is 'none' but credentials are set")
        return d
    if d.auth == "basic":
        if not d.username:
            raise ConfigError(f"{key}.username", "is required when auth = 'basic'")
        if not secret:
            raise ConfigError(f"{key}.password", "is required when auth = 'basic' (or secret_file "
                              "/ secret_env)")
        return dataclasses.replace(d, password=secret)
    if not secret:
        raise ConfigError(f"{key}.token", "is required when auth = 'bearer' (or secret_file / "
                          "secret_env)")
    return dataclasses.replace(d, token=secret)


def _read_secret(d: DestinationConfig, key: str) -> str:
    """The password/token from exactly one of: the key itself, ``secret_file``, ``secret_env``."""
    sources = [k for k, v in (("password", d.password), ("token", d.token),
                              ("secret_file", d.secret_file), ("secret_env", d.secret_env)) if v]
    if len(sources) > 1:
        raise ConfigError(f"{key}.{sources[1]}", f"give the secret once (also set: {sources[0]})")
    if d.password and d.auth != "basic":
        raise ConfigError(f"{key}.password", "only applies to auth = 'basic'")
    if d.token and d.auth != "bearer":
        raise ConfigError(f"{key}.token", "only applies to auth = 'bearer'")
    if d.secret_file is not None:
        try:
            return Path(d.secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{key}.secret_file", f"cannot read: {exc}") from None
    if d.secret_env:
        value = os.environ.get(d.secret_env, "")
        if not value:
            raise ConfigError(f"{key}.secret_env", f"environment variable {d.secret_env} is unset "
                              "or empty")
        return value
    return d.password or d.token


def _check_tls(tls: TLSConfig, key: str, server: bool = True) -> None:
    if not tls.enabled:
        return
    if server:
        for name in ("cert_file", "key_file"):
            if getattr(tls, name) is None:
                raise ConfigError(f"{key}.{name}", "is required when TLS is enabled")
    if tls.require_client_cert and tls.ca_file is None:
        raise ConfigError(f"{key}.ca_file", "is required when require_client_cert = true")
    for name in ("cert_file", "key_file", "ca_file"):
        p = getattr(tls, name)
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{key}.{name}", f"file not found: {p}")


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML mapping.

    Relative paths are resolved against ``base_dir`` (the config file's folder), so a config file
    means the same thing whatever the working directory.
    """
    base = (base_dir or Path.cwd()).resolve()
    data = dict(data)
    dests = data.pop("destinations", [])
    if not isinstance(dests, list):
        raise ConfigError("destinations", "expected an array of tables ([[destinations]])")
    gate_table = data.pop("gate", {})
    try:  # the gate parses its own section (per-AE sub-tables, ranges)
        gate = gate_config_from_dict(gate_table if isinstance(gate_table, dict) else {})
    except ValueError as exc:
        raise ConfigError("gate", str(exc)) from None
    cfg = dataclasses.replace(_build(Config, data, "", base), gate=gate)
    built = tuple(
        _build(DestinationConfig, d, f"destinations[{i}]", base) if isinstance(d, dict)
        else _raise(f"destinations[{i}]", "expected a table")
        for i, d in enumerate(dests)
    )
    return _validate(dataclasses.replace(cfg, destinations=built))


def _raise(key: str, msg: str) -> Any:
    raise ConfigError(key, msg)


def load_config(path: str | Path) -> Config:
    """Read and validate ``config.toml``; raise :class:`ConfigError` naming the bad key."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("<file>", f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", f"{p} is not valid TOML: {exc}") from None
    cfg = config_from_dict(data, base_dir=p.resolve().parent)
    return dataclasses.replace(cfg, source_path=p.resolve())
