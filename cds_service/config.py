"""Typed settings read from CXR_CDS_* environment variables and validated at start-up."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cds_service.errors import ConfigurationError
from cds_service.observability.logs import LOG_FORMATS
from cds_service.sources import canonical_fhir_base, same_fhir_base

log = logging.getLogger(__name__)

Mode = Literal["production", "development", "demo"]
MODES: tuple[Mode, ...] = ("production", "development", "demo")
BACKENDS = ("simulated", "cxr_llava", "hf_vlm", "tiny")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # CXR_CDS_MODEL_DEVICE
# CDS Hooks 2.0 security: ES384/RS384 recommended; none and every HS* are forbidden.
ALLOWED_JWT_ALGORITHMS = frozenset({"ES256", "ES384", "RS256", "RS384"})


# How often an inference worker reports in and renews the leases of its running jobs, and
# how long after its last renewal a running job is handed out again (CXR_CDS_JOB_LEASE_S).
HEARTBEAT_S = 5.0
JOB_LEASE_S = 60.0


@dataclass(frozen=True)
class TrustedIssuer:
    """A CDS client the service accepts JWTs from, and the FHIR servers it may send us to."""

    iss: str
    jwks: Mapping[str, Any] | None = None
    jwks_url: str | None = None
    allowed_jku: tuple[str, ...] = ()
    fhir_servers: tuple[str, ...] = ()
    # With pinned inline keys, a `jku` header is only a hint: never fetched, never required.
    ignore_jku: bool = False

    def allows_fhir_server(self, url: str) -> bool:
        """True when `url` is one of this issuer's FHIR bases (compared in canonical form)."""
        return any(same_fhir_base(url, allowed) for allowed in self.fhir_servers)

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> TrustedIssuer:
        if not isinstance(item, Mapping) or not isinstance(item.get("iss"), str) or not item["iss"]:
            raise ConfigurationError("each trusted issuer needs a non-empty string 'iss'")
        jwks = item.get("jwks")
        jwks_url = item.get("jwks_url")
        if (jwks is None) == (jwks_url is None):
            raise ConfigurationError(
                f"trusted issuer {item['iss']!r}: give exactly one of 'jwks' or 'jwks_url'"
            )
        if jwks is not None and not (
            isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list)
        ):
            raise ConfigurationError(f"trusted issuer {item['iss']!r}: 'jwks' must be a JWK Set")
        ignore_jku = item.get("ignore_jku", False)
        if not isinstance(ignore_jku, bool) or (ignore_jku and jwks is None):
            raise ConfigurationError(
                f"trusted issuer {item['iss']!r}: 'ignore_jku' must be a boolean and needs "
                "inline 'jwks'"
            )
        allowed_jku = item.get("allowed_jku", [])
        fhir_servers = item.get("fhir_servers", [])
        for name, value in (("allowed_jku", allowed_jku), ("fhir_servers", fhir_servers)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigurationError(f"trusted issuer {item['iss']!r}: {name} must be a list")
        return cls(
            iss=item["iss"],
            jwks=jwks,
            jwks_url=jwks_url,
            allowed_jku=tuple(allowed_jku),
            fhir_servers=tuple(fhir_servers),
            ignore_jku=ignore_jku,
        )


def _read_json_list(path: str | Path, what: str) -> list[Any]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {what} file {path}: {exc}") from exc
    if not isinstance(raw, list):
        raise ConfigurationError(f"{path}: expected a JSON list of {what}")
    return raw


def load_trusted_issuers(path: str | Path) -> tuple[TrustedIssuer, ...]:
    """Read the JSON list named by CXR_CDS_TRUSTED_ISSUERS."""
    raw = _read_json_list(path, "trusted issuers")
    issuers = tuple(TrustedIssuer.from_json(item) for item in raw)
    if len({i.iss for i in issuers}) != len(issuers):
        raise ConfigurationError(f"{path}: an issuer appears twice")
    return issuers


# Create the report's resources, and read the ImagingStudy to check it before writing.
WRITE_BACK_SCOPE = (
    "system/DiagnosticReport.c system/Observation.c system/Device.c system/Provenance.c "
    "system/ImagingStudy.rs"
)
# Find the study's pixels: its DICOMweb Endpoints, else its DICOM Media and their Binary.
IMAGE_READ_SCOPE = "system/Endpoint.rs system/Media.rs system/Binary.rs"
# What the service asks an EHR for by default: write-back plus image retrieval.
SERVICE_SCOPE = f"{WRITE_BACK_SCOPE} {IMAGE_READ_SCOPE}"


@dataclass(frozen=True)
class EhrClient:
    """One EHR the service writes reports to: its FHIR base and our registration there."""

    fhir_base: str
    token_url: str
    client_id: str
    key_file: Path
    scope: str = SERVICE_SCOPE
    # WADO-RS bases (URL prefixes) this EHR's Endpoints may point to besides its own FHIR
    # origin; they, and no other EHR's, receive this EHR's Backend Services token.
    image_servers: tuple[str, ...] = ()
    # The secret this EHR's FHIR Subscriptions send (channel.header "Authorization: Bearer
    # ..."): it tells the notification receiver which data source is calling.
    notification_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, item: Any) -> EhrClient:
        required = ("fhir_base", "token_url", "client_id", "jwk_file")
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in required):
            raise ConfigurationError(f"each EHR client needs string fields {required}")
        servers = item.get("image_servers", [])
        if not isinstance(servers, list) or any(
            not isinstance(u, str) or urlsplit(u).scheme not in {"http", "https"} for u in servers
        ):
            raise ConfigurationError("an EHR client's image_servers must be http(s) URLs")
        return cls(
            fhir_base=item["fhir_base"].rstrip("/"),
            token_url=item["token_url"],
            client_id=item["client_id"],
            key_file=Path(item["jwk_file"]),
            scope=item.get("scope") or cls.scope,
            image_servers=tuple(servers),
            notification_token=_notification_token(item),
        )


def _notification_token(item: dict[str, Any]) -> str | None:
    """The optional 'notification_token_file' of an EHR client: at least 32 characters."""
    path = item.get("notification_token_file")
    if path is None:
        return None
    if not isinstance(path, str):
        raise ConfigurationError("an EHR client's notification_token_file must be a path")
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read notification_token_file {path}: {exc}") from exc
    if len(token) < 32 or any(c.isspace() for c in token):
        raise ConfigurationError(
            f"notification_token_file {path}: the token must be one word of 32+ characters"
        )
    return token


def load_ehr_clients(path: str | Path) -> tuple[EhrClient, ...]:
    """Read CXR_CDS_EHR_CLIENTS: a JSON list of EHR client registrations."""
    return tuple(EhrClient.from_json(item) for item in _read_json_list(path, "EHR clients"))


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"not a boolean: {value!r}")


QUEUES = ("embedded", "celery")


def _setting_or_file(env: Mapping[str, str], name: str) -> str | None:
    """``name`` from the environment, or the first line of the file ``name``_FILE names (a
    secret mounted as a file); None when neither is set."""
    if env.get(name):
        return env[name].strip()
    path = env.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip().splitlines()[0]
    except (OSError, IndexError) as exc:
        raise ConfigurationError(f"{name}_FILE: cannot read a value from {path}") from exc


@dataclass(frozen=True)
class Settings:
    """Every setting of the service. Build with `Settings.from_env()` or directly in tests."""

    mode: Mode = "production"
    public_url: str = ""
    trusted_issuers: tuple[TrustedIssuer, ...] = ()
    auth_enabled: bool = True
    database: Path = Path("var/cxr-cds.sqlite3")
    backend: str = "simulated"
    model_dir: str | None = None
    # Model runtime (cds_service.inference): device, generation length, batching, timeout.
    model_device: str = "auto"
    max_new_tokens: int = 512
    model_batch_size: int = 8
    model_timeout_s: float = 600.0
    # A running job whose worker stopped renewing its lease this long ago is handed out again.
    job_lease_s: float = JOB_LEASE_S
    smart_app_url: str = ""
    lookback_days: int = 365
    max_studies: int = 5
    on_missing_data: Literal["412", "no-card"] = "412"
    enqueue_on_miss: bool = True
    hook_wait_ms: int = 0
    fhir_connect_timeout_s: float = 2.0
    fhir_read_timeout_s: float = 5.0
    max_prefetch_pages: int = 5
    jwt_leeway_s: int = 60
    max_request_bytes: int = 5 * 1024 * 1024
    ehr_clients: tuple[EhrClient, ...] = ()  # EHRs to write reports to (Backend Services)
    # Accept JWTs from the public CDS Hooks sandbox (its private key is public): never in
    # production. Its keys are pinned in the package; its jku is never fetched.
    trust_public_sandbox: bool = False
    # The FHIR bases the public CDS Hooks sandbox may name as fhirServer (its results are
    # those of that data source, shared with every other caller configured for it).
    public_sandbox_fhir_servers: tuple[str, ...] = ()
    # Image servers (WADO-RS bases, URL prefixes) any EHR's studies may point to; they get no
    # EHR's token (list a PACS that needs one under that EHR's image_servers in
    # CXR_CDS_EHR_CLIENTS). Then the limits on every image fetched or decoded.
    image_servers: tuple[str, ...] = ()
    # FHIR bases (URL prefixes) that may launch the SMART app without being a CDS client,
    # e.g. the SMART launcher's https://launch.smarthealthit.org/v/r4/ (CXR_CDS_APP_FHIR_SERVERS).
    app_fhir_servers: tuple[str, ...] = ()
    image_max_bytes: int = 64 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    # Operations: GET /metrics (Prometheus, no PHI) and the log line format (text or json).
    metrics_enabled: bool = True
    log_format: str = "text"
    # Scale-out: all state in PostgreSQL (a postgresql:// DSN; None: the SQLite file above),
    # and job wake-ups over Celery on Redis (queue "celery") instead of workers polling the
    # database ("embedded"). The DSN may hold a password: it is never logged or shown.
    database_url: str | None = field(default=None, repr=False)
    queue: str = "embedded"
    redis_url: str | None = field(default=None, repr=False)

    @property
    def simulated(self) -> bool:
        return self.backend == "simulated"

    def accepted_issuers(self) -> tuple[TrustedIssuer, ...]:
        """The configured issuers, plus the public CDS Hooks sandbox when asked for."""
        if not self.trust_public_sandbox:
            return self.trusted_issuers
        from cds_service.security.public_sandbox import public_sandbox_issuer

        public = replace(public_sandbox_issuer(), fhir_servers=self.public_sandbox_fhir_servers)
        return (*self.trusted_issuers, public)

    def fhir_bases_without_access(self) -> list[str]:
        """The FHIR bases trusted callers may name whose studies the worker cannot read: no
        CXR_CDS_EHR_CLIENTS registration for them (start-up warns about each)."""
        registered = {canonical_fhir_base(client.fhir_base) for client in self.ehr_clients}
        missing: list[str] = []
        for issuer in self.accepted_issuers():
            for base in issuer.fhir_servers:
                base = canonical_fhir_base(base)
                if base not in registered and base not in missing:
                    missing.append(base)
        return missing

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes).validated()

    def validated(self) -> Settings:
        """Refuse unsafe or inconsistent settings; returns self when all is well."""
        if self.mode not in MODES:
            raise ConfigurationError(f"CXR_CDS_MODE must be one of {MODES}, not {self.mode!r}")
        if self.queue not in QUEUES:
            raise ConfigurationError(f"CXR_CDS_QUEUE must be one of {QUEUES}, not {self.queue!r}")
        if self.database_url is not None and urlsplit(self.database_url).scheme not in {
            "postgresql",
            "postgres",
        }:
            raise ConfigurationError("CXR_CDS_DATABASE_URL must be a postgresql:// URL")
        if self.queue == "celery" and (self.redis_url is None or self.database_url is None):
            raise ConfigurationError(
                "CXR_CDS_QUEUE=celery needs CXR_CDS_REDIS_URL (the broker) and "
                "CXR_CDS_DATABASE_URL (workers on several machines share PostgreSQL, not a "
                "SQLite file)"
            )
        if self.backend not in BACKENDS:
            raise ConfigurationError(f"CXR_CDS_BACKEND must be one of {BACKENDS}")
        for name, url in (
            ("CXR_CDS_PUBLIC_URL", self.public_url),
            ("CXR_CDS_SMART_APP_URL", self.smart_launch_url()),
        ):
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ConfigurationError(
                    f"{name} must be an absolute http(s) URL (JWT aud and card links use it)"
                )
        if not self.auth_enabled and self.mode != "development":
            raise ConfigurationError(
                "authentication can be switched off only with CXR_CDS_MODE=development"
            )
        if self.trust_public_sandbox:
            if self.mode == "production":
                raise ConfigurationError(
                    "CXR_CDS_TRUST_PUBLIC_SANDBOX=1 is refused in production: the public CDS "
                    "Hooks sandbox's private key is published, anyone can sign as it. Use "
                    "CXR_CDS_MODE=development or demo."
                )
            from cds_service.security.public_sandbox import PUBLIC_SANDBOX_ISS

            if any(i.iss == PUBLIC_SANDBOX_ISS for i in self.trusted_issuers):
                raise ConfigurationError(
                    "the public CDS Hooks sandbox is both in CXR_CDS_TRUSTED_ISSUERS and "
                    "trusted by CXR_CDS_TRUST_PUBLIC_SANDBOX: keep one"
                )
        if self.mode == "production":
            if not self.public_url.startswith("https://"):
                raise ConfigurationError(
                    "production needs CXR_CDS_PUBLIC_URL with https:// (JWT aud is checked "
                    "against it; CDS Hooks requires TLS)"
                )
            if not self.smart_launch_url().startswith("https://"):
                raise ConfigurationError("production needs an https:// CXR_CDS_SMART_APP_URL")
            for ehr in self.ehr_clients:
                if not (
                    ehr.fhir_base.startswith("https://") and ehr.token_url.startswith("https://")
                ):
                    raise ConfigurationError(
                        f"EHR client {ehr.client_id!r}: http:// FHIR or token URLs are refused "
                        "in production"
                    )
            if not self.trusted_issuers:
                raise ConfigurationError(
                    "production needs CXR_CDS_TRUSTED_ISSUERS: a JSON file listing the CDS "
                    "clients to trust; there is no open default"
                )
            for issuer in self.trusted_issuers:
                urls = [*issuer.fhir_servers, *issuer.allowed_jku]
                if issuer.jwks_url:
                    urls.append(issuer.jwks_url)
                if any(not url.startswith("https://") for url in urls):
                    raise ConfigurationError(
                        f"issuer {issuer.iss!r}: http:// FHIR, JWKS or jku URLs are refused in "
                        "production"
                    )
        if self.lookback_days < 1 or self.max_studies < 1 or self.max_prefetch_pages < 1:
            raise ConfigurationError(
                "CXR_CDS_LOOKBACK_DAYS, CXR_CDS_MAX_STUDIES and CXR_CDS_MAX_PREFETCH_PAGES "
                "must be >= 1"
            )
        if not (0 < self.fhir_connect_timeout_s <= 60 and 0 < self.fhir_read_timeout_s <= 60):
            raise ConfigurationError("FHIR timeouts must be > 0 and <= 60 seconds")
        if not 0 <= self.hook_wait_ms <= 10_000:
            raise ConfigurationError("CXR_CDS_HOOK_WAIT_MS must be between 0 and 10000")
        if self.on_missing_data not in ("412", "no-card"):
            raise ConfigurationError("CXR_CDS_ON_MISSING_DATA must be '412' or 'no-card'")
        if not (1 <= self.max_new_tokens <= 4096 and 1 <= self.model_batch_size <= 256):
            raise ConfigurationError(
                "CXR_CDS_MAX_NEW_TOKENS must be 1..4096 and CXR_CDS_MODEL_BATCH_SIZE 1..256"
            )
        if self.model_timeout_s <= 0 or not _DEVICE.fullmatch(self.model_device):
            raise ConfigurationError(
                "CXR_CDS_MODEL_TIMEOUT must be > 0; CXR_CDS_MODEL_DEVICE auto, cpu or cuda[:N]"
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigurationError(f"CXR_CDS_LOG_FORMAT must be one of {LOG_FORMATS}")
        if self.job_lease_s < 3 * HEARTBEAT_S:
            raise ConfigurationError(
                f"CXR_CDS_JOB_LEASE_S must be at least {3 * HEARTBEAT_S:.0f} s (three heartbeats)"
            )
        if self.image_max_bytes < 1 or self.image_max_pixels < 1:
            raise ConfigurationError("CXR_CDS_IMAGE_MAX_BYTES and _MAX_PIXELS must be >= 1")
        if any(urlsplit(u).scheme not in {"http", "https"} for u in self.image_servers):
            raise ConfigurationError("CXR_CDS_IMAGE_SERVERS must be absolute http(s) URLs")
        for url in self.app_fhir_servers:
            wanted = {"https"} if self.mode == "production" else {"http", "https"}
            if urlsplit(url).scheme not in wanted or not urlsplit(url).netloc:
                raise ConfigurationError(
                    "CXR_CDS_APP_FHIR_SERVERS must be absolute URLs (https:// in production)"
                )
        if any(
            urlsplit(u).scheme not in {"http", "https"} or not urlsplit(u).netloc
            for u in self.public_sandbox_fhir_servers
        ):
            raise ConfigurationError(
                "CXR_CDS_PUBLIC_SANDBOX_FHIR_SERVERS must be absolute http(s) URLs"
            )
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read CXR_CDS_* variables; raises ConfigurationError with what to fix."""
        env = os.environ if env is None else env
        mode = env.get("CXR_CDS_MODE", "production")
        issuers: tuple[TrustedIssuer, ...] = ()
        if env.get("CXR_CDS_TRUSTED_ISSUERS"):
            issuers = load_trusted_issuers(env["CXR_CDS_TRUSTED_ISSUERS"])
        auth = env.get("CXR_CDS_AUTH", "on").strip().lower()
        if auth not in {"on", "off"}:
            raise ConfigurationError("CXR_CDS_AUTH must be 'on' or 'off'")
        public_url = env.get("CXR_CDS_PUBLIC_URL", "").rstrip("/")
        ehr_clients: tuple[EhrClient, ...] = ()
        if env.get("CXR_CDS_EHR_CLIENTS"):
            ehr_clients = load_ehr_clients(env["CXR_CDS_EHR_CLIENTS"])
        try:
            settings = cls(
                mode=mode,  # type: ignore[arg-type]  # checked in validated()
                public_url=public_url,
                trusted_issuers=issuers,
                auth_enabled=auth == "on",
                database=Path(env.get("CXR_CDS_DB", "var/cxr-cds.sqlite3")),
                backend=env.get("CXR_CDS_BACKEND", "simulated"),
                model_dir=env.get("CXR_CDS_MODEL_DIR") or None,
                model_device=env.get("CXR_CDS_MODEL_DEVICE", "auto"),
                max_new_tokens=int(env.get("CXR_CDS_MAX_NEW_TOKENS", "512")),
                model_batch_size=int(env.get("CXR_CDS_MODEL_BATCH_SIZE", "8")),
                model_timeout_s=float(env.get("CXR_CDS_MODEL_TIMEOUT", "600")),
                job_lease_s=float(env.get("CXR_CDS_JOB_LEASE_S", "60")),
                smart_app_url=env.get("CXR_CDS_SMART_APP_URL", "").rstrip("/"),
                lookback_days=int(env.get("CXR_CDS_LOOKBACK_DAYS", "365")),
                max_studies=int(env.get("CXR_CDS_MAX_STUDIES", "5")),
                max_prefetch_pages=int(env.get("CXR_CDS_MAX_PREFETCH_PAGES", "5")),
                on_missing_data=env.get("CXR_CDS_ON_MISSING_DATA", "412"),  # type: ignore[arg-type]
                enqueue_on_miss=_bool(env.get("CXR_CDS_ENQUEUE_ON_MISS", "1")),
                hook_wait_ms=int(env.get("CXR_CDS_HOOK_WAIT_MS", "0")),
                fhir_connect_timeout_s=float(env.get("CXR_CDS_FHIR_CONNECT_TIMEOUT", "2")),
                fhir_read_timeout_s=float(env.get("CXR_CDS_FHIR_READ_TIMEOUT", "5")),
                ehr_clients=ehr_clients,
                trust_public_sandbox=_bool(env.get("CXR_CDS_TRUST_PUBLIC_SANDBOX", "0")),
                public_sandbox_fhir_servers=tuple(
                    env.get("CXR_CDS_PUBLIC_SANDBOX_FHIR_SERVERS", "").split()
                ),
                image_servers=tuple(env.get("CXR_CDS_IMAGE_SERVERS", "").split()),
                app_fhir_servers=tuple(env.get("CXR_CDS_APP_FHIR_SERVERS", "").split()),
                image_max_bytes=int(env.get("CXR_CDS_IMAGE_MAX_BYTES", str(64 * 1024 * 1024))),
                image_max_pixels=int(env.get("CXR_CDS_IMAGE_MAX_PIXELS", "40000000")),
                metrics_enabled=_bool(env.get("CXR_CDS_METRICS", "on")),
                log_format=env.get("CXR_CDS_LOG_FORMAT", "text").strip().lower(),
                database_url=_setting_or_file(env, "CXR_CDS_DATABASE_URL"),
                queue=env.get("CXR_CDS_QUEUE", "embedded").strip().lower(),
                redis_url=_setting_or_file(env, "CXR_CDS_REDIS_URL"),
            )
        except ValueError as exc:
            raise ConfigurationError(f"malformed number in CXR_CDS_* settings: {exc}") from exc
        return settings.validated()

    def smart_launch_url(self) -> str:
        """Where card links send the clinician (the SMART app's launch endpoint)."""
        return self.smart_app_url or f"{self.public_url}/app/launch"
