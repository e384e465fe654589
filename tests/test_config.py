"""Settings refuse unsafe defaults outside development."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cds_service.config import Settings, load_trusted_issuers
from cds_service.errors import ConfigurationError

JWKS = {"keys": [{"kty": "EC", "crv": "P-384", "kid": "k", "x": "a", "y": "b"}]}


def issuers_file(tmp_path: Path, items: list[dict[str, object]]) -> str:
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps(items))
    return str(path)


def test_production_needs_https_public_url_and_issuers(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="CXR_CDS_PUBLIC_URL"):
        Settings.from_env({"CXR_CDS_PUBLIC_URL": "http://cds.example"})
    with pytest.raises(ConfigurationError, match="CXR_CDS_TRUSTED_ISSUERS"):
        Settings.from_env({"CXR_CDS_PUBLIC_URL": "https://cds.example"})
    path = issuers_file(
        tmp_path, [{"iss": "https://ehr", "jwks": JWKS, "fhir_servers": ["https://ehr/fhir"]}]
    )
    settings = Settings.from_env(
        {"CXR_CDS_PUBLIC_URL": "https://cds.example/", "CXR_CDS_TRUSTED_ISSUERS": path}
    )
    assert settings.public_url == "https://cds.example"
    assert settings.trusted_issuers[0].allows_fhir_server("https://ehr/fhir/")
    assert not settings.trusted_issuers[0].allows_fhir_server("https://ehr/fhir2")


def test_auth_off_only_in_development(tmp_path: Path) -> None:
    path = issuers_file(tmp_path, [{"iss": "https://ehr", "jwks": JWKS}])
    with pytest.raises(ConfigurationError, match="development"):
        Settings.from_env(
            {
                "CXR_CDS_PUBLIC_URL": "https://cds.example",
                "CXR_CDS_TRUSTED_ISSUERS": path,
                "CXR_CDS_AUTH": "off",
            }
        )
    dev = Settings.from_env(
        {
            "CXR_CDS_MODE": "development",
            "CXR_CDS_AUTH": "off",
            "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:8080",
        }
    )
    assert not dev.auth_enabled


def test_http_fhir_servers_refused_in_production(tmp_path: Path) -> None:
    path = issuers_file(
        tmp_path, [{"iss": "https://ehr", "jwks": JWKS, "fhir_servers": ["http://ehr/fhir"]}]
    )
    with pytest.raises(ConfigurationError, match="http://"):
        Settings.from_env(
            {"CXR_CDS_PUBLIC_URL": "https://cds.example", "CXR_CDS_TRUSTED_ISSUERS": path}
        )


@pytest.mark.parametrize(
    "items,message",
    [
        ([{"jwks": JWKS}], "iss"),
        ([{"iss": "a"}], "exactly one"),
        ([{"iss": "a", "jwks": JWKS, "jwks_url": "https://a/jwks"}], "exactly one"),
        ([{"iss": "a", "jwks": {"nokeys": 1}}], "JWK Set"),
        ([{"iss": "a", "jwks": JWKS}, {"iss": "a", "jwks": JWKS}], "twice"),
        ({"iss": "a"}, "list"),
    ],
)
def test_malformed_issuer_files_are_refused(tmp_path: Path, items: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(items))
    with pytest.raises(ConfigurationError, match=message):
        load_trusted_issuers(path)


def test_unknown_mode_and_bad_numbers() -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env({"CXR_CDS_MODE": "yolo", "CXR_CDS_PUBLIC_URL": "http://x"})
    with pytest.raises(ConfigurationError, match="number"):
        Settings.from_env({"CXR_CDS_MODE": "development", "CXR_CDS_LOOKBACK_DAYS": "many"})


def test_urls_must_be_absolute_and_https_in_production(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="CXR_CDS_PUBLIC_URL"):
        Settings.from_env({"CXR_CDS_MODE": "development", "CXR_CDS_AUTH": "off"})
    with pytest.raises(ConfigurationError, match="CXR_CDS_SMART_APP_URL"):
        Settings.from_env(
            {
                "CXR_CDS_MODE": "demo",
                "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:1",
                "CXR_CDS_SMART_APP_URL": "viewer",
            }
        )
    path = issuers_file(
        tmp_path, [{"iss": "https://ehr", "jwks": JWKS, "fhir_servers": ["https://ehr/fhir"]}]
    )
    with pytest.raises(ConfigurationError, match="SMART_APP_URL"):
        Settings.from_env(
            {
                "CXR_CDS_PUBLIC_URL": "https://cds.example",
                "CXR_CDS_TRUSTED_ISSUERS": path,
                "CXR_CDS_SMART_APP_URL": "http://viewer.example/launch",
            }
        )
    jku = issuers_file(
        tmp_path, [{"iss": "https://ehr", "jwks": JWKS, "allowed_jku": ["http://ehr/jwks.json"]}]
    )
    with pytest.raises(ConfigurationError, match="jku"):
        Settings.from_env(
            {"CXR_CDS_PUBLIC_URL": "https://cds.example", "CXR_CDS_TRUSTED_ISSUERS": jku}
        )


def test_auth_off_is_refused_in_demo_mode_too() -> None:
    with pytest.raises(ConfigurationError, match="development"):
        Settings.from_env(
            {
                "CXR_CDS_MODE": "demo",
                "CXR_CDS_AUTH": "off",
                "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:8080",
            }
        )


@pytest.mark.parametrize(
    "name,value",
    [
        ("CXR_CDS_FHIR_CONNECT_TIMEOUT", "0"),
        ("CXR_CDS_FHIR_READ_TIMEOUT", "-1"),
        ("CXR_CDS_HOOK_WAIT_MS", "-5"),
        ("CXR_CDS_MAX_PREFETCH_PAGES", "0"),
    ],
)
def test_out_of_range_numbers_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env(
            {
                "CXR_CDS_MODE": "development",
                "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:8080",
                name: value,
            }
        )


def test_fhir_bases_without_a_registration_are_named_for_the_start_up_warning(
    tmp_path: Path,
) -> None:
    from cds_service.config import EhrClient, TrustedIssuer

    settings = Settings(
        mode="development",
        trusted_issuers=(
            TrustedIssuer("https://a", JWKS, fhir_servers=("https://a/fhir/", "https://b/fhir")),
            TrustedIssuer("https://c", JWKS, fhir_servers=("https://b/fhir",)),
        ),
        ehr_clients=(EhrClient("https://a/fhir", "https://a/token", "cxr", tmp_path / "k.json"),),
    )
    assert settings.fhir_bases_without_access() == ["https://b/fhir"]
