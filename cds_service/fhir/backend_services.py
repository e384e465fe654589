"""SMART Backend Services client: client_credentials with a private_key_jwt assertion."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import requests
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from cds_service.config import EhrClient, load_ehr_clients
from cds_service.errors import ConfigurationError
from cds_service.fhir.client import FhirUnavailable, new_session
from cds_service.sources import canonical_fhir_base

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: assertion lifetime at most 5 minutes; we use 4 to absorb clock skew.
ASSERTION_LIFETIME_S = 240
REFRESH_MARGIN_S = 30


def load_signing_key(path: Path) -> ECKey | RSAKey:
    """A private EC (ES384) or RSA (RS384) JWK with a kid, from a JSON file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(data, dict) or not data.get("kid"):
        raise ConfigurationError(f"{path}: a JWK with a 'kid' is required")
    key: ECKey | RSAKey
    if data.get("kty") == "EC" and data.get("crv") == "P-384":
        key = ECKey.import_key(data)
    elif data.get("kty") == "RSA":
        key = RSAKey.import_key(data)
    else:
        raise ConfigurationError(f"{path}: need an EC P-384 (ES384) or RSA (RS384) private JWK")
    if not key.is_private:
        raise ConfigurationError(f"{path}: the JWK has no private part")
    return key


class BackendServicesClient:
    """Gets and caches a system access token for one EHR (SMART App Launch 2.x)."""

    def __init__(
        self,
        ehr: EhrClient,
        key: ECKey | RSAKey | None = None,
        *,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (3.0, 10.0),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ehr = ehr
        self._key = key or load_signing_key(ehr.key_file)
        self._alg = "ES384" if isinstance(self._key, ECKey) else "RS384"
        self._session = session or new_session()
        self._timeout = timeout
        self._clock = clock
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def assertion(self) -> str:
        """The signed client assertion: iss = sub = client_id, aud = token URL, unique jti."""
        now = int(self._clock())
        claims = {
            "iss": self.ehr.client_id,
            "sub": self.ehr.client_id,
            "aud": self.ehr.token_url,
            "exp": now + ASSERTION_LIFETIME_S,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        header = {"alg": self._alg, "kid": str(self._key.kid), "typ": "JWT"}
        return jwt.encode(header, claims, self._key, algorithms=[self._alg])

    def access_token(self) -> str:
        with self._lock:
            if self._token is not None and self._token[1] - REFRESH_MARGIN_S > self._clock():
                return self._token[0]
            form = {
                "grant_type": "client_credentials",
                "scope": self.ehr.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(),
            }
            try:
                response = self._session.post(
                    self.ehr.token_url, data=form, timeout=self._timeout, allow_redirects=False
                )
                body = response.json()
            except (requests.RequestException, ValueError) as exc:
                raise FhirUnavailable(f"token endpoint unreachable: {type(exc).__name__}") from exc
            if response.status_code != 200 or not isinstance(body, dict):
                error = body.get("error") if isinstance(body, dict) else None
                raise FhirUnavailable(f"token endpoint answered {response.status_code} {error}")
            token = body.get("access_token")
            if not isinstance(token, str) or not token:
                raise FhirUnavailable("token endpoint answered without an access_token")
            expires_in = body.get("expires_in")
            lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
            self._token = (token, self._clock() + lifetime)
            return token


class BackendServicesClients:
    """The service's registrations with EHRs, by canonical FHIR base, each with one client
    (made when first needed) that everything in the process shares: reading studies and
    images, reading arrivals and filing reports use the same token cache per EHR."""

    def __init__(self, ehrs: Sequence[EhrClient]) -> None:
        self.ehrs = tuple(ehrs)
        self._registered = {canonical_fhir_base(ehr.fhir_base): ehr for ehr in self.ehrs}
        self._clients: dict[str, BackendServicesClient] = {}
        self._lock = threading.Lock()

    def registration(self, fhir_server: str | None) -> EhrClient | None:
        """The registration with the EHR at this FHIR base (None: the service has none)."""
        return self._registered.get(canonical_fhir_base(fhir_server)) if fhir_server else None

    def client(self, fhir_server: str | None) -> BackendServicesClient | None:
        """The shared client for this FHIR base (None: no registration). Loads its signing key
        on first use (ConfigurationError when the key file is unreadable)."""
        ehr = self.registration(fhir_server)
        if ehr is None:
            return None
        base = canonical_fhir_base(ehr.fhir_base)
        with self._lock:
            if base not in self._clients:
                self._clients[base] = BackendServicesClient(ehr)
            return self._clients[base]


__all__ = [
    "BackendServicesClient",
    "BackendServicesClients",
    "EhrClient",
    "load_ehr_clients",
    "load_signing_key",
]
