"""The public CDS Hooks sandbox as a peer: its JWTs, its request shapes, its PAMA imaging tab.

The real sandbox cannot run here (its web app needs a browser and its own servers), so these
tests replay what it sends on the wire: a JWT it really signed (verified against the pinned
keys), and requests shaped as its source builds them (no fhirAuthorization, prefetch it fills
itself, `Practitioner/COREPRACTITIONER1`, a draft chest CT ServiceRequest coded in CPT with a
reasonCode, in a Bundle without `type`). The requests are signed with a key of our own
registered under the sandbox's issuer, since its private key is not in this repository.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc.jwk import ECKey

from cds_service.config import Settings, TrustedIssuer
from cds_service.errors import ConfigurationError, Unauthorized
from cds_service.fhir import imaging_study
from cds_service.inference.simulated import SimulatedBackend
from cds_service.jobs.worker import drain
from cds_service.security.client_jwt import ClientJwtVerifier, JwksFetcher
from cds_service.security.public_sandbox import (
    PUBLIC_SANDBOX_ISS,
    PUBLIC_SANDBOX_KID,
    public_sandbox_issuer,
)
from cds_service.storage.ports import Storage, StudyRef
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    claims_for,
    make_service,
    sign,
)

# A JWT the public sandbox signed on 2020-07-08 (iat 1594230600) for the audience below,
# published in a public code example that checks it. Header: ES384, kid 44823f3d-...,
# jku https://sandbox.cds-hooks.org/.well-known/jwks.json; 300 s lifetime; no sub.
REAL_SANDBOX_TOKEN = (
    "eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCIsImtpZCI6IjQ0ODIzZjNkLTBiMDEtNGE2Yy1hODBlLWI5ZDNlOGE3"
    "MjI2ZiIsImprdSI6Imh0dHBzOi8vc2FuZGJveC5jZHMtaG9va3Mub3JnLy53ZWxsLWtub3duL2p3a3MuanNvbiJ9."
    "eyJpc3MiOiJodHRwczovL3NhbmRib3guY2RzLWhvb2tzLm9yZyIsImF1ZCI6Imh0dHA6Ly8xMjcuMC4wLjE6ODAw"
    "MC9jZHMtc2VydmljZXMiLCJleHAiOjE1OTQyMzA5MDAsImlhdCI6MTU5NDIzMDYwMCwianRpIjoiZWZiMzc3M2Qt"
    "M2EyOC00M2UyLTlmYmMtYjkzNmE5YWUzODhiIn0."
    "Cbey3n5NkDRoCLHZ2WMFc1z_RY8Rlq5oGxdAYfbrBPMiJXLCwjbYoU0av2CQj-Olhbnpe7Vs8vzJ5oHP5gc2-0oo"
    "c5J49t4Uz9iYKpiM9KLUrqaJe0umc_klM2-ynHAI"
)
REAL_TOKEN_AUDIENCE = "http://127.0.0.1:8000/cds-services"
REAL_TOKEN_IAT = 1594230600
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
SANDBOX_USER = "Practitioner/COREPRACTITIONER1"
# The sandbox's default FHIR server: never contacted (no fhirAuthorization is sent).
SANDBOX_FHIR = "https://launch.smarthealthit.org/v/r4/fhir"


class NoNetworkFetcher(JwksFetcher):
    def get(self, url: str, *, refresh: bool = False) -> dict[str, Any] | None:
        raise AssertionError(f"the pinned issuer must not fetch {url}")


class MemoryJtis:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def remember_jti(self, iss: str, jti: str, expires_at: int) -> bool:
        if (iss, jti) in self.seen:
            return False
        self.seen.add((iss, jti))
        return True


def verifier(issuers: tuple[TrustedIssuer, ...]) -> ClientJwtVerifier:
    return ClientJwtVerifier(
        issuers, MemoryJtis(), jwks_fetcher=NoNetworkFetcher(), clock=lambda: REAL_TOKEN_IAT + 10
    )


def test_a_token_the_real_sandbox_signed_verifies_with_the_pinned_keys_and_no_fetch() -> None:
    verified = verifier((public_sandbox_issuer(),)).verify(
        f"Bearer {REAL_SANDBOX_TOKEN}", REAL_TOKEN_AUDIENCE
    )
    assert verified.issuer.iss == PUBLIC_SANDBOX_ISS
    assert verified.claims["exp"] - verified.claims["iat"] == 300
    assert "sub" not in verified.claims


def test_the_real_token_is_refused_when_tampered_or_not_trusted() -> None:
    header, payload, signature = REAL_SANDBOX_TOKEN.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(Unauthorized):
        verifier((public_sandbox_issuer(),)).verify(
            f"Bearer {header}.{payload}.{flipped}", REAL_TOKEN_AUDIENCE
        )
    with pytest.raises(Unauthorized):  # another audience: aud is the exact URL called
        verifier((public_sandbox_issuer(),)).verify(
            f"Bearer {REAL_SANDBOX_TOKEN}", "http://127.0.0.1:8000/cds-services/other"
        )
    with pytest.raises(Unauthorized):  # not trusted unless asked for
        verifier(()).verify(f"Bearer {REAL_SANDBOX_TOKEN}", REAL_TOKEN_AUDIENCE)


def test_pinned_keys_are_the_sandbox_es384_key() -> None:
    issuer = public_sandbox_issuer()
    assert issuer.jwks is not None and issuer.ignore_jku and issuer.fhir_servers == ()
    (key,) = issuer.jwks["keys"]
    assert (key["kid"], key["crv"], key["alg"]) == (PUBLIC_SANDBOX_KID, "P-384", "ES384")
    assert "d" not in key


def test_trusting_the_public_sandbox_is_opt_in_and_refused_in_production(tmp_path: Path) -> None:
    env = {"CXR_CDS_MODE": "development", "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:8080"}
    assert Settings.from_env(env).accepted_issuers() == ()
    trusting = Settings.from_env({**env, "CXR_CDS_TRUST_PUBLIC_SANDBOX": "1"})
    assert [i.iss for i in trusting.accepted_issuers()] == [PUBLIC_SANDBOX_ISS]
    with pytest.raises(ConfigurationError, match="refused in production"):
        Settings.from_env(
            {
                "CXR_CDS_PUBLIC_URL": "https://cds.example.org",
                "CXR_CDS_TRUST_PUBLIC_SANDBOX": "1",
            }
        )
    with pytest.raises(ConfigurationError, match="boolean"):
        Settings.from_env({**env, "CXR_CDS_TRUST_PUBLIC_SANDBOX": "maybe"})


# -- requests shaped like the sandbox's, through HTTP ---------------------------------------
class SandboxPeer:
    """Signs and sends hook requests the way the public sandbox does."""

    def __init__(self, handle: ServiceHandle, key: ECKey) -> None:
        self.handle = handle
        self.key = key

    def post(self, service_id: str, body: dict[str, Any]) -> requests.Response:
        url = self.handle.url(service_id)
        header = {"alg": "ES384", "typ": "JWT", "kid": self.key.kid, "jku": SANDBOX_JKU}
        token = sign(self.key, claims_for(PUBLIC_SANDBOX_ISS, url), header=header)
        return requests.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}", "Origin": "https://sandbox.cds-hooks.org"},
            timeout=10,
        )


@pytest.fixture
def peer(tmp_path: Path, sandbox: SandboxHandle) -> Iterator[SandboxPeer]:
    key = ECKey.generate_key("P-384", auto_kid=True)
    # The sandbox's issuer, our key: same code path as the pinned issuer (inline keys,
    # jku ignored), with a private key the test holds.
    issuer = TrustedIssuer(
        iss=PUBLIC_SANDBOX_ISS,
        jwks={"keys": [{**key.as_dict(private=False), "kid": key.kid}]},
        ignore_jku=True,
    )
    handle, server = make_service(tmp_path, sandbox, trusted_issuers=(issuer,), mode="development")
    analyse_for_sandbox_issuer(handle.store, sandbox)
    yield SandboxPeer(handle, key)
    server.stop()


def analyse_for_sandbox_issuer(store: Storage, sandbox: SandboxHandle) -> None:
    backend = SimulatedBackend()
    for study in sandbox.studies:
        uid = imaging_study.study_uid(study)
        assert uid
        ref = StudyRef(PUBLIC_SANDBOX_ISS, uid, imaging_study.subject_patient_id(study))
        store.jobs.enqueue(ref, backend.model, study, None)
    drain(store, backend)


def prefetch_for(sandbox: SandboxHandle, patient: str) -> dict[str, Any]:
    """What the sandbox puts in prefetch after running our template against its server."""
    studies = [s for s in sandbox.studies if imaging_study.subject_patient_id(s) == patient]
    assert studies
    return {
        "chestStudies": {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(studies),
            "entry": [{"fullUrl": f"{SANDBOX_FHIR}/ImagingStudy/{s['id']}", "resource": s}
                      for s in studies],
        }
    }  # fmt: skip


def hook_body(hook: str, patient: str, **context: Any) -> dict[str, Any]:
    return {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": SANDBOX_FHIR,
        "context": {"userId": SANDBOX_USER, "patientId": patient, **context},
    }


def pama_order(cpt: str, text: str, patient: str) -> dict[str, Any]:
    """The PAMA Imaging tab's draft order: CPT-coded, with a reason, Bundle without type."""
    return {
        "resourceType": "Bundle",
        "entry": [
            {
                "resource": {
                    "resourceType": "ServiceRequest",
                    "id": "pama-order-1",
                    "status": "draft",
                    "intent": "plan",
                    "code": {
                        "coding": [
                            {
                                "system": "http://www.ama-assn.org/go/cpt",
                                "code": cpt,
                                "display": text,
                            }
                        ]
                    },
                    "subject": {"reference": f"Patient/{patient}"},
                    "reasonCode": [
                        {
                            "coding": [
                                {
                                    "system": "http://snomed.info/sct",
                                    "code": "13645005",
                                    "display": "Chronic obstructive lung disease",
                                }
                            ]
                        }
                    ],
                }
            }
        ],
    }


def test_patient_view_from_prefetch_alone(peer: SandboxPeer, sandbox: SandboxHandle) -> None:
    body = {
        **hook_body("patient-view", "cxr-demo-1"),
        "prefetch": prefetch_for(sandbox, "cxr-demo-1"),
    }
    response = peer.post("cxr-ai-patient-view", body)
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert cards and all("SIMULATED" in c["summary"] for c in cards)
    assert all(c["source"]["label"] for c in cards)
    assert response.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"


def test_pama_tab_chest_ct_order_gets_the_prior_radiograph_findings(
    peer: SandboxPeer, sandbox: SandboxHandle
) -> None:
    context = {"draftOrders": pama_order("71250", "CT thorax w/o contrast", "cxr-demo-1"),
               "selections": ["ServiceRequest/pama-order-1"]}  # fmt: skip
    body = {**hook_body("order-select", "cxr-demo-1", **context),
            "prefetch": prefetch_for(sandbox, "cxr-demo-1")}  # fmt: skip
    response = peer.post("cxr-ai-order-select", body)
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert cards and all(c["summary"].startswith("SIMULATED: Prior ") for c in cards)
    assert any("radiograph" in c["summary"].lower() for c in cards)


def test_pama_tab_order_for_another_body_part_gets_no_card(
    peer: SandboxPeer, sandbox: SandboxHandle
) -> None:
    context = {"draftOrders": pama_order("72133", "Lumbar spine CT", "cxr-demo-1")}
    body = {**hook_body("order-select", "cxr-demo-1", **context),
            "prefetch": prefetch_for(sandbox, "cxr-demo-1")}  # fmt: skip
    response = peer.post("cxr-ai-order-select", body)
    assert response.status_code == 200 and response.json() == {"cards": []}


def test_rx_tab_medication_orders_get_no_card(peer: SandboxPeer) -> None:
    meds = {"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "MedicationRequest", "id": "rx-1", "status": "draft", "intent": "order",
        "medicationCodeableConcept": {"text": "Amoxicillin 500 mg"}}}]}  # fmt: skip
    response = peer.post(
        "cxr-ai-order-sign", hook_body("order-sign", "cxr-demo-1", draftOrders=meds)
    )
    assert response.status_code == 200 and response.json() == {"cards": []}


def test_neither_prefetch_nor_access_is_412_or_no_card(
    peer: SandboxPeer, tmp_path: Path, sandbox: SandboxHandle
) -> None:
    response = peer.post("cxr-ai-patient-view", hook_body("patient-view", "cxr-demo-1"))
    assert response.status_code == 412
    assert "prefetch" in response.text

    quiet, server = make_service(
        tmp_path / "quiet",
        sandbox,
        trusted_issuers=peer.handle.settings.trusted_issuers,
        mode="development",
        on_missing_data="no-card",
    )
    try:
        response = SandboxPeer(quiet, peer.key).post(
            "cxr-ai-patient-view", hook_body("patient-view", "cxr-demo-1")
        )
        assert response.status_code == 200 and response.json() == {"cards": []}
    finally:
        server.stop()


def test_a_jwt_claiming_the_pinned_issuer_with_another_key_is_refused(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    handle, server = make_service(tmp_path, sandbox, mode="development", trust_public_sandbox=True)
    try:
        forger = ECKey.generate_key("P-384")
        url = handle.url("cxr-ai-patient-view")
        header = {"alg": "ES384", "typ": "JWT", "kid": PUBLIC_SANDBOX_KID, "jku": SANDBOX_JKU}
        token = sign(forger, claims_for(PUBLIC_SANDBOX_ISS, url), header=header)
        response = requests.post(
            url,
            json=hook_body("patient-view", "cxr-demo-1"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert response.status_code == 401
    finally:
        server.stop()


def test_browser_preflight_as_the_sandbox_sends_it(service: ServiceHandle) -> None:
    response = requests.options(
        service.url("cxr-ai-patient-view"),
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )
    assert response.status_code in (200, 204)
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
