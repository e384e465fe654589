"""The public CDS Hooks sandbox (sandbox.cds-hooks.org) as a trusted issuer, for trials only.

Its signing key pair is published with its source, so anyone can sign as it: `Settings`
refuses it in production. Its public keys are pinned in this package
(`cds_hooks_sandbox_jwks.json`, from the sandbox's Apache-2.0 repository), so its `jku`
header is never fetched. It sends no `fhirAuthorization` unless an app launch gave it one, so
no FHIR server is allowed: the service works from the prefetch it sends.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from cds_service.config import TrustedIssuer

PUBLIC_SANDBOX_ISS = "https://sandbox.cds-hooks.org"
PUBLIC_SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
_JWKS_FILE = "cds_hooks_sandbox_jwks.json"


@cache
def public_sandbox_issuer() -> TrustedIssuer:
    text = resources.files(__package__).joinpath(_JWKS_FILE).read_text(encoding="utf-8")
    return TrustedIssuer(iss=PUBLIC_SANDBOX_ISS, jwks=json.loads(text), ignore_jku=True)
