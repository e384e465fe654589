"""The demo's settings for the peers (plain unit tests: they run in `make test` too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cds_service.config import Settings, TrustedIssuer
from cds_service.fhir.backend_services import EhrClient
from cds_service.web.demo import demo_settings

SANDBOX = "http://127.0.0.1:8081"


@pytest.fixture(autouse=True, scope="session")
def _only_from_peers_check() -> None:
    """These need no peer: they override the folder's skip."""


def _settings(env: dict[str, str], tmp_path: Path) -> Settings:
    issuer = TrustedIssuer(iss=SANDBOX, jwks={"keys": []}, fhir_servers=(f"{SANDBOX}/fhir",))
    ehr = EhrClient(
        fhir_base=f"{SANDBOX}/fhir",
        token_url=f"{SANDBOX}/auth/token",
        client_id="c",
        key_file=tmp_path / "k.json",
    )
    return demo_settings(env, "http://127.0.0.1:8080", tmp_path, issuer, ehr)


def test_trusting_the_public_sandbox_lets_it_see_the_demo_ehr(tmp_path: Path) -> None:
    settings = _settings({"CXR_CDS_TRUST_PUBLIC_SANDBOX": "1"}, tmp_path)
    public = next(
        i for i in settings.accepted_issuers() if i.iss == "https://sandbox.cds-hooks.org"
    )
    assert public.allows_fhir_server(f"{SANDBOX}/fhir")
    assert _settings({}, tmp_path).public_sandbox_fhir_servers == ()


def test_an_explicit_list_and_the_launcher_prefix_are_kept(tmp_path: Path) -> None:
    env = {
        "CXR_CDS_TRUST_PUBLIC_SANDBOX": "1",
        "CXR_CDS_PUBLIC_SANDBOX_FHIR_SERVERS": "http://127.0.0.1:9999/fhir",
        "CXR_CDS_APP_FHIR_SERVERS": "http://127.0.0.1:8095/v/r4/",
    }
    settings = _settings(env, tmp_path)
    assert settings.public_sandbox_fhir_servers == ("http://127.0.0.1:9999/fhir",)
    assert settings.app_fhir_servers == ("http://127.0.0.1:8095/v/r4/",)
