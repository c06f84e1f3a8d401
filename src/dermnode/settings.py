"""Configuration: embedded defaults, an optional TOML file, and environment overrides.

Settings are built once at start-up (:func:`load_settings`) and passed down explicitly; nothing in dermnode
reads configuration at import time.

Precedence (lowest to highest): the dataclass defaults below, the TOML file given by ``--config`` or
``DERMNODE_CONFIG``, then environment variables ``DERMNODE_<SECTION>__<KEY>`` (e.g.
``DERMNODE_SCP__PORT=11113``). Every value is type-checked and range-checked; an error names the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermnode.errors import ConfigError

ENV_PREFIX = "DERMNODE_"


@dataclass(frozen=True)
class TLSSettings:
    """DICOM TLS for the SCP or for an outgoing association."""

    enabled: bool = False
    certificate: str = ""  # PEM file of our certificate (server side) or client certificate
    private_key: str = ""
    ca_certificates: str = ""  # PEM bundle used to verify the peer
    require_client_certificate: bool = False  # server side: mutual TLS


@dataclass(frozen=True)
class ScpSettings:
    ae_title: str = "DERMNODE"
    bind: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE title
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu: int = 65536
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass(frozen=True)
class StorageSettings:
    root: str = "var"
    min_free_mb: int = 500
    fsync: bool = True


@dataclass(frozen=True)
class StateSettings:
    """Where the job queue and the outbox live: ``sqlite`` (``<storage.root>/dermnode.db``, one process) or
    ``postgresql`` (shared by many receivers and workers; see docs/scale-out.md)."""

    backend: str = "sqlite"
    dsn: str = ""  # libpq string or URI without password, e.g. "host=db.example dbname=dermnode user=dermnode"
    password: str = field(default="", repr=False)  # only from DERMNODE_STATE__PASSWORD (or libpq's PGPASSWORD)
    lease_s: float = 30.0  # a claimed job/delivery whose owner stops renewing is taken over after this
    notify_poll_s: float = 2.0  # idle workers are woken by NOTIFY; they still poll this often
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class WorkerSettings:
    count: int = 1
    max_attempts: int = 3
    retry_delay_s: float = 5.0  # doubles with each failed attempt ...
    retry_delay_max_s: float = 600.0  # ... up to this (the outbox's policy: exponential, capped)
    poll_interval_s: float = 0.1  # idle workers look for new jobs this often (one indexed SQLite query)
    shutdown_grace_s: float = 30.0


@dataclass(frozen=True)
class DeviceCalibration:
    """Pixel size of a dermoscope that does not write Pixel Spacing, keyed by Manufacturer + Model."""

    manufacturer: str = ""
    model: str = ""
    pixel_spacing_mm: float = 0.0


@dataclass(frozen=True)
class AnalysisSettings:
    models_dir: str = ""  # empty: the models/ folder shipped with dermnode
    band_benign_below: float = 0.15
    band_malignant_above: float = 0.85
    hair_removal: str = "multiscale"  # "none" | "blackhat" | "multiscale" (see models/segmentation.md)
    clahe: bool = False
    calibrations: tuple[DeviceCalibration, ...] = ()
    torch_threads: int = 1  # intra-op threads of the networks' runtime; 0: its default (stalls on a busy 2-core host)
    # "auto": ONNX Runtime for a model shipped with its .onnx file, PyTorch otherwise; "onnx" (required) | "torch"
    network_runtime: str = "auto"
    # band calibration file (cut-offs for a stated miss rate, see `dermnode calibrate`): empty = the one shipped
    # beside the classifier (<classifier_model>.calibration.json) when present; "none" = the band_* values above
    calibration: str = ""
    segmentation_model: str = "segmentation"  # model file stems in the models folder: pin an older version
    classifier_model: str = "classifier"  # (e.g. "classifier-1.0.0") without replacing the shipped files


@dataclass(frozen=True)
class OutputSettings:
    manufacturer: str = "dermnode project"
    institution_name: str = ""
    seg_series_number: int = 9001
    seg_series_description: str = "dermnode lesion segmentation"
    sr_series_number: int = 9002
    sr_series_description: str = "dermnode dermoscopy AI report"
    fractional_seg: bool = False
    presentation_state: bool = True  # Color Softcopy Presentation State with the outline over the source image
    pr_series_number: int = 9003
    pr_series_description: str = "dermnode outline - decision support only"
    burned_in_image: bool = False  # key image with the outline burned in (Secondary Capture)
    key_image_series_number: int = 9004
    key_image_series_description: str = "dermnode overlay — not for diagnosis"


@dataclass(frozen=True)
class PacsDestination:
    name: str = "pacs"
    ae_title: str = ""  # required in a [[pacs]] table (validated): no silent guess of the archive's address
    host: str = ""
    port: int = 0
    calling_ae_title: str = ""  # empty: scp.ae_title
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass(frozen=True)
class DeliverySettings:
    max_attempts: int = 8
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 600.0
    poll_interval_s: float = 0.2  # an idle outbox looks for due deliveries this often


@dataclass(frozen=True)
class FhirSettings:
    base_url: str = ""  # empty: bundles are written as files under storage.root
    version: str = "R4"  # "R4" | "R5"
    bearer_token: str = ""
    verify_tls: bool = True
    ca_bundle: str = ""
    timeout_s: float = 30.0
    patient_identifier_system: str = ""  # used when Issuer of Patient ID is absent
    preliminary_when_indeterminate: bool = True
    include_overlay: bool = True
    imaging_study_resource: bool = True  # False: reference the study by identifier only


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    json: bool = False


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 8081


@dataclass(frozen=True)
class WebUser:
    """One console user: a name, a salted password hash and a role."""

    name: str = ""
    # "scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>" or "pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>", made with
    # `python -m dermnode.web.auth hash` (a password never appears in the configuration)
    password_hash: str = ""
    role: str = "user"  # "user": worklist, results, upload; "admin": also replays dead-lettered work


@dataclass(frozen=True)
class WebSettings:
    """The web console (worklist, result pages, upload, status), served by ``dermnode serve``."""

    enabled: bool = True
    bind: str = "127.0.0.1"  # beyond loopback only with authentication (users, users_file or bearer_token)
    port: int = 8080
    max_upload_mb: int = 50  # largest single file of an upload
    max_upload_files: int = 20  # files per upload (the request body is refused above files x size)
    users: tuple[WebUser, ...] = ()
    users_file: str = ""  # TOML file with [[users]] tables (name, password_hash, role), read at start-up
    bearer_token: str = ""  # "Authorization: Bearer <token>" (scripts); admin rights; never logged
    session_secret: str = ""  # signs session cookies; empty: a random secret per process (log in again after
    # a restart)
    session_max_age_s: float = 28_800.0  # a login lasts this long (8 h)
    secure_cookies: bool = False  # mark cookies Secure (behind a TLS-terminating proxy); always on with TLS below
    tls_certificate: str = ""  # PEM certificate and key: serve the console over HTTPS
    tls_private_key: str = ""
    refresh_s: float = 5.0  # the worklist reloads itself this often while jobs are queued or running
    page_size: int = 25  # worklist rows per page


#: The password hash formats the console verifies (see dermnode.web.auth).
_PASSWORD_HASH = re.compile(
    r"^(scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=_-]+\$[A-Za-z0-9+/=_-]+"
    r"|pbkdf2_sha256\$\d+\$[A-Za-z0-9+/=_-]+\$[A-Za-z0-9+/=_-]+)$"
)
WEB_ROLES: tuple[str, ...] = ("user", "admin")


def is_loopback(bind: str) -> bool:
    """Whether a listen address reaches this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    if bind.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or an invalid address: treated as reachable from elsewhere


@dataclass(frozen=True)
class Settings:
    scp: ScpSettings = field(default_factory=ScpSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    state: StateSettings = field(default_factory=StateSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    pacs: tuple[PacsDestination, ...] = ()
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    fhir: FhirSettings = field(default_factory=FhirSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    web: WebSettings = field(default_factory=WebSettings)

    @property
    def storage_root(self) -> Path:
        return Path(self.storage.root)


_RANGES: dict[str, tuple[float, float]] = {
    "scp.port": (0, 65535),
    "scp.max_associations": (1, 1000),
    "scp.max_pdu": (0, 2**32 - 1),
    "storage.min_free_mb": (0, 10**9),
    "workers.count": (0, 64),
    "workers.max_attempts": (1, 100),
    "analysis.band_benign_below": (0.0, 1.0),
    "analysis.band_malignant_above": (0.0, 1.0),
    "pacs.port": (1, 65535),
    "delivery.max_attempts": (1, 1000),
    "http.port": (0, 65535),
    "web.port": (0, 65535),
    "web.max_upload_mb": (1, 4096),
    "web.max_upload_files": (1, 1000),
    "web.page_size": (1, 500),
    "output.seg_series_number": (1, 2**31 - 1),
    "output.sr_series_number": (1, 2**31 - 1),
    "output.pr_series_number": (1, 2**31 - 1),
    "output.key_image_series_number": (1, 2**31 - 1),
    "analysis.torch_threads": (0, 256),
}
#: Durations in seconds that must be positive (a zero poll interval is a busy loop, a zero timeout fails at once).
_POSITIVE: tuple[str, ...] = (
    "scp.acse_timeout_s",
    "scp.dimse_timeout_s",
    "scp.network_timeout_s",
    "workers.retry_delay_s",
    "workers.retry_delay_max_s",
    "workers.poll_interval_s",
    "workers.shutdown_grace_s",
    "delivery.backoff_initial_s",
    "delivery.backoff_max_s",
    "delivery.poll_interval_s",
    "fhir.timeout_s",
    "web.session_max_age_s",
    "web.refresh_s",
    "state.lease_s",
    "state.notify_poll_s",
    "state.connect_timeout_s",
)
#: Upper bound of every duration above (one day): larger values are typing mistakes (ms for s).
_MAX_DURATION_S = 86_400.0
_CHOICES: dict[str, tuple[str, ...]] = {
    "analysis.hair_removal": ("none", "blackhat", "multiscale"),
    "analysis.network_runtime": ("auto", "onnx", "torch"),
    "fhir.version": ("R4", "R5"),
    "state.backend": ("sqlite", "postgresql"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")  # pragma: no cover - programming error


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown setting {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "DERMNODE_CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another override")
        node[path[-1]] = value
    return tree


def _validate(settings: Settings) -> None:
    for p in settings.pacs:
        if p.port == 0:
            raise ConfigError(f"pacs.port is required in the [[pacs]] table {p.name!r}")
    flat: dict[str, Any] = {}
    for section in dataclasses.fields(settings):
        value = getattr(settings, section.name)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if dataclasses.is_dataclass(item):
                for f in dataclasses.fields(item):
                    flat.setdefault(f"{section.name}.{f.name}", []).append(getattr(item, f.name))
    for key, (lo, hi) in _RANGES.items():
        for v in flat.get(key, []):
            if not lo <= v <= hi:
                raise ConfigError(f"{key}: {v} is outside [{lo}, {hi}]")
    for key in _POSITIVE:
        for v in flat.get(key, []):
            if not 0 < v <= _MAX_DURATION_S:
                raise ConfigError(f"{key}: {v} must be a number of seconds above 0 and at most {_MAX_DURATION_S:.0f}")
    for key, choices in _CHOICES.items():
        for v in flat.get(key, []):
            if v not in choices:
                raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")
    aets = [
        ("scp.ae_title", settings.scp.ae_title),
        *(("scp.allowed_calling_aets", a) for a in settings.scp.allowed_calling_aets),
        *(("pacs.ae_title", p.ae_title) for p in settings.pacs),
        *(("pacs.calling_ae_title", p.calling_ae_title) for p in settings.pacs if p.calling_ae_title),
    ]
    for key, aet in aets:
        if not aet.strip() or len(aet) > 16 or "\\" in aet or not aet.isprintable():
            raise ConfigError(f"{key}: AE title {aet!r} is invalid (1-16 printable characters, no backslash)")
    _validate_state(settings.state)
    if settings.workers.retry_delay_s > settings.workers.retry_delay_max_s:
        raise ConfigError("workers.retry_delay_s must not exceed workers.retry_delay_max_s")
    if settings.delivery.backoff_initial_s > settings.delivery.backoff_max_s:
        raise ConfigError("delivery.backoff_initial_s must not exceed delivery.backoff_max_s")
    for p in settings.pacs:
        if not p.host.strip():
            raise ConfigError(f"pacs.host is required in the [[pacs]] table {p.name!r}")
    names = [p.name for p in settings.pacs]
    for name in names:
        if not name.strip() or not name.isprintable():
            raise ConfigError(f"pacs.name {name!r} is invalid (printable characters, not empty)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"pacs.name {duplicates[0]!r} names more than one [[pacs]] table: give every destination its own name"
        )
    a = settings.analysis
    if a.band_benign_below > a.band_malignant_above:
        raise ConfigError("analysis.band_benign_below must not exceed analysis.band_malignant_above")
    tls = settings.scp.tls
    if not tls.enabled and (tls.certificate or tls.private_key or tls.require_client_certificate):
        raise ConfigError(
            "scp.tls has a certificate, key or client-certificate requirement but scp.tls.enabled is false: the "
            "SCP would accept plain associations; set scp.tls.enabled = true (or remove those keys)"
        )
    if tls.enabled and not (tls.certificate and tls.private_key):
        raise ConfigError("scp.tls.enabled needs scp.tls.certificate and scp.tls.private_key")
    if tls.require_client_certificate and not tls.ca_certificates:
        raise ConfigError("scp.tls.require_client_certificate needs scp.tls.ca_certificates")
    validate_web_settings(settings.web)
    if settings.fhir.base_url and not settings.fhir.base_url.startswith(("http://", "https://")):
        raise ConfigError("fhir.base_url must start with http:// or https://")
    if settings.fhir.base_url and not settings.fhir.patient_identifier_system.strip():
        raise ConfigError(
            "fhir.base_url is set but fhir.patient_identifier_system is empty: set it to the EHR's system URI of "
            "DICOM Patient IDs (e.g. the MRN system), used when an image carries no Issuer of Patient ID OID; "
            "without it reports would be filed under patients that match nobody in the EHR"
        )


def _validate_state(state: StateSettings) -> None:
    if state.backend != "postgresql":
        return
    if not state.dsn.strip():
        raise ConfigError('state.dsn is required with state.backend = "postgresql" (e.g. "host=db dbname=dermnode '
                          'user=dermnode")')
    from psycopg import conninfo

    try:
        params = conninfo.conninfo_to_dict(state.dsn)
    except Exception as exc:  # psycopg.ProgrammingError: the message quotes the string, so it is not repeated
        raise ConfigError(f"state.dsn is not a valid libpq connection string or URI ({type(exc).__name__})") from None
    if params.get("password"):
        raise ConfigError("state.dsn must not hold the password: set DERMNODE_STATE__PASSWORD or PGPASSWORD")


def web_auth_configured(web: WebSettings) -> bool:
    """Whether the console asks who is there (users, a users file or a bearer token)."""
    return bool(web.users or web.users_file.strip() or web.bearer_token)


def validate_web_settings(web: WebSettings) -> None:
    names = [u.name for u in web.users]
    for user in web.users:
        if not user.name.strip() or not user.name.isprintable() or user.name != user.name.strip():
            raise ConfigError(f"web.users.name {user.name!r} is invalid (printable characters, not empty)")
        if not _PASSWORD_HASH.match(user.password_hash):
            raise ConfigError(
                f"web.users.password_hash of {user.name!r} is not a salted hash (scrypt$... or pbkdf2_sha256$...): "
                "make one with `python -m dermnode.web.auth hash`; a plain password is never accepted"
            )
        if user.role not in WEB_ROLES:
            raise ConfigError(f"web.users.role {user.role!r} of {user.name!r} is not one of {', '.join(WEB_ROLES)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"web.users.name {duplicates[0]!r} names more than one user")
    if web.bearer_token and len(web.bearer_token) < 16:
        raise ConfigError("web.bearer_token is too short: use at least 16 random characters (e.g. 32 from a CSPRNG)")
    if web.session_secret and len(web.session_secret) < 32:
        raise ConfigError("web.session_secret is too short: use at least 32 random characters (or leave it empty)")
    if bool(web.tls_certificate) != bool(web.tls_private_key):
        raise ConfigError("web.tls_certificate and web.tls_private_key go together: set both (HTTPS) or neither")
    if web.enabled and not is_loopback(web.bind) and not web_auth_configured(web):
        raise ConfigError(
            f"web.bind = {web.bind!r} makes the web console reachable beyond this machine, but no authentication is "
            "configured: set web.users (or web.users_file) with salted password hashes, or web.bearer_token; or "
            "keep web.bind on 127.0.0.1 (or set web.enabled = false)"
        )


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from defaults, an optional TOML file and the environment.

    Parameters
    ----------
    path:
        TOML file; when ``None``, ``DERMNODE_CONFIG`` is used if set, else only the defaults apply.
    environ:
        Environment to read overrides from (default: ``os.environ``).

    Returns
    -------
    Settings
        The validated settings.

    Raises
    ------
    ConfigError
        When the file cannot be read or parsed, or a key is unknown, mistyped or out of range.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is None and env.get("DERMNODE_CONFIG"):
        path = env["DERMNODE_CONFIG"]
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    state_file = data.get("state")
    if isinstance(state_file, dict) and state_file.get("password"):
        raise ConfigError("state.password must not be in the configuration file: set DERMNODE_STATE__PASSWORD "
                          "(or PGPASSWORD) in the service's environment")
    data = _merge(data, _env_overrides(env))
    settings: Settings = _build(Settings, data, "")
    _validate(settings)
    return settings


