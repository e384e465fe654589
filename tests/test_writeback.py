"""Backend Services token grant and transaction write-back against the sandbox, on real sockets."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from cds_service.config import WRITE_BACK_SCOPE
from cds_service.fhir.backend_services import (
    ASSERTION_TYPE,
    BackendServicesClient,
    EhrClient,
    load_ehr_clients,
)
from cds_service.fhir.client import FhirAccessDenied
from cds_service.fhir.writeback import write_transaction
from tests.conftest import SandboxHandle


def register(
    sandbox: SandboxHandle, key: ECKey | RSAKey, client_id: str, scope: str = WRITE_BACK_SCOPE
) -> None:
    public = {**key.as_dict(private=False), "kid": key.kid}
    sandbox.sandbox.backend.register(client_id, {"keys": [public]}, scope)


def ehr(sandbox: SandboxHandle, client_id: str, tmp_path: Path, key: ECKey | RSAKey) -> EhrClient:
    key_file = tmp_path / f"{client_id}.jwk.json"
    key_file.write_text(json.dumps({**key.as_dict(private=True), "kid": key.kid}))
    return EhrClient(
        fhir_base=sandbox.fhir,
        token_url=f"{sandbox.base}/auth/token",
        client_id=client_id,
        key_file=key_file,
    )


def report_bundle(identifier: str) -> dict[str, Any]:
    """A small transaction: Device, Observation -> Device, DiagnosticReport -> Observation."""
    device, obs, report = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    system = "urn:cxr-cds:test"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": report,
                "resource": {
                    "resourceType": "DiagnosticReport",
                    "status": "preliminary",
                    "identifier": [{"system": system, "value": identifier}],
                    "code": {"text": "XR chest"},
                    "subject": {"reference": "Patient/cxr-demo-1"},
                    "result": [{"reference": obs}],
                },
                "request": {
                    "method": "POST",
                    "url": "DiagnosticReport",
                    "ifNoneExist": f"identifier={system}|{identifier}",
                },
            },
            {
                "fullUrl": obs,
                "resource": {
                    "resourceType": "Observation",
                    "status": "preliminary",
                    "identifier": [{"system": system, "value": f"{identifier}-obs"}],
                    "code": {"text": "Pneumothorax"},
                    "device": {"reference": device},
                },
                "request": {
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": f"identifier={system}|{identifier}-obs",
                },
            },
            {
                "fullUrl": device,
                "resource": {
                    "resourceType": "Device",
                    "identifier": [{"system": system, "value": "model-v1"}],
                },
                "request": {
                    "method": "POST",
                    "url": "Device",
                    "ifNoneExist": f"identifier={system}|model-v1",
                },
            },
        ],
    }


def test_write_twice_leaves_exactly_one_report(tmp_path: Path, sandbox: SandboxHandle) -> None:
    key = ECKey.generate_key("P-384", auto_kid=True)
    register(sandbox, key, "cxr-cds-es")
    auth = BackendServicesClient(ehr(sandbox, "cxr-cds-es", tmp_path, key))
    identifier = uuid.uuid4().hex
    first = write_transaction(auth, report_bundle(identifier))
    second = write_transaction(auth, report_bundle(identifier))
    assert first.created and not second.created
    assert (
        first.report_location.split("/_history")[0] == second.report_location.split("/_history")[0]
    )
    found = requests.get(
        f"{sandbox.fhir}/DiagnosticReport",
        params={"identifier": f"urn:cxr-cds:test|{identifier}"},
        timeout=10,
    ).json()
    assert found["total"] == 1
    report = found["entry"][0]["resource"]
    obs_ref = report["result"][0]["reference"]
    assert obs_ref.startswith("Observation/") and "urn:uuid" not in json.dumps(report)
    observation = requests.get(f"{sandbox.fhir}/{obs_ref}", timeout=10).json()
    assert observation["device"]["reference"].startswith("Device/")


def test_rs384_clients_work_too(tmp_path: Path, sandbox: SandboxHandle) -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)
    register(sandbox, key, "cxr-cds-rs")
    auth = BackendServicesClient(ehr(sandbox, "cxr-cds-rs", tmp_path, key))
    assert write_transaction(auth, report_bundle(uuid.uuid4().hex)).created
    # The token is cached: a second call does not ask the token endpoint again.
    assert auth.access_token() == auth.access_token()


def test_writes_need_a_token_with_create_scope(tmp_path: Path, sandbox: SandboxHandle) -> None:
    bundle = report_bundle(uuid.uuid4().hex)
    anonymous = requests.post(f"{sandbox.fhir}/", json=bundle, timeout=10)
    assert anonymous.status_code == 401
    key = ECKey.generate_key("P-384", auto_kid=True)
    register(sandbox, key, "reader", scope="system/*.rs")
    reader = BackendServicesClient(
        EhrClient(
            fhir_base=sandbox.fhir,
            token_url=f"{sandbox.base}/auth/token",
            client_id="reader",
            key_file=tmp_path / "unused",
            scope="system/*.rs",
        ),
        key,
    )
    with pytest.raises(FhirAccessDenied):
        write_transaction(reader, bundle)


def assertion(key: ECKey | RSAKey, alg: str, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": "cxr-cds-es2",
        "sub": "cxr-cds-es2",
        "exp": now + 240,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, body, key, algorithms=[alg])


def test_token_endpoint_refuses_bad_assertions(sandbox: SandboxHandle) -> None:
    key = ECKey.generate_key("P-384", auto_kid=True)
    register(sandbox, key, "cxr-cds-es2")
    token_url = f"{sandbox.base}/auth/token"
    now = int(time.time())

    def ask(client_assertion: str, **form: str) -> requests.Response:
        data = {
            "grant_type": "client_credentials",
            "scope": WRITE_BACK_SCOPE,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion,
        }
        data.update(form)
        return requests.post(token_url, data=data, timeout=10)

    good = assertion(key, "ES384", aud=token_url)
    assert ask(good).status_code == 200
    assert ask(good).json()["error"] == "invalid_client"  # jti replayed
    other = ECKey.generate_key("P-384", auto_kid=True)
    bad = {
        "wrong aud": assertion(key, "ES384", aud=sandbox.base),
        "sub differs": assertion(key, "ES384", aud=token_url, sub="someone"),
        "expired": assertion(key, "ES384", aud=token_url, exp=now - 300, iat=now - 600),
        "lives an hour": assertion(key, "ES384", aud=token_url, exp=now + 3600),
        "unknown client": assertion(key, "ES384", aud=token_url, iss="x", sub="x"),
        "other key": jwt.encode(
            {"alg": "ES384", "kid": key.kid},
            json.loads(
                json.dumps(
                    {
                        "iss": "cxr-cds-es2",
                        "sub": "cxr-cds-es2",
                        "aud": token_url,
                        "exp": now + 200,
                        "iat": now,
                        "jti": "j1",
                    }
                )
            ),
            other,
            algorithms=["ES384"],
        ),
        "no jti": assertion(key, "ES384", aud=token_url, jti=None),
        "garbage": "not.a.jwt",
    }
    for name, value in bad.items():
        response = ask(value)
        assert response.status_code == 401, name
        assert response.json()["error"] == "invalid_client", name
    assert ask(assertion(key, "ES384", aud=token_url), grant_type="password").status_code == 400
    no_scope = ask(assertion(key, "ES384", aud=token_url), scope="system/*.cruds")
    assert no_scope.json()["error"] == "invalid_scope"


def test_smart_configuration_names_the_token_endpoint(sandbox: SandboxHandle) -> None:
    config = requests.get(f"{sandbox.fhir}/.well-known/smart-configuration", timeout=10).json()
    assert config["token_endpoint"] == f"{sandbox.base}/auth/token"
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]


def test_ehr_clients_file(tmp_path: Path) -> None:
    path = tmp_path / "ehrs.json"
    path.write_text(
        json.dumps(
            [
                {
                    "fhir_base": "https://ehr/fhir/",
                    "token_url": "https://ehr/t",
                    "client_id": "c",
                    "jwk_file": "/k.json",
                }
            ]
        )
    )
    [client] = load_ehr_clients(path)
    assert client.fhir_base == "https://ehr/fhir" and "system/DiagnosticReport.c" in client.scope
