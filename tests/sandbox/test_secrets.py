"""The sandbox's secrets live in its data directory: every worker process shares them."""

from __future__ import annotations

import base64
import hashlib
import re
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from ehr_sandbox.app import Sandbox, SandboxSettings, create_app
from ehr_sandbox.auth.smart_store import SmartApp
from ehr_sandbox.cds_client import SigningKey
from ehr_sandbox.secret_files import form_secret

BASE = "http://ehr.test"
REDIRECT = "http://app.test/callback"


def authorize_query() -> str:
    digest = hashlib.sha256(b"v" * 50).digest()
    return urlencode(
        {
            "response_type": "code",
            "client_id": "two-workers-app",
            "redirect_uri": REDIRECT,
            "scope": "launch/patient patient/Patient.rs",
            "state": "s" * 24,
            "aud": f"{BASE}/fhir",
            "code_challenge": base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
    )


def test_a_sign_in_form_from_one_worker_is_accepted_by_another(tmp_path: Path) -> None:
    settings = SandboxSettings(data_dir=tmp_path, base_url=BASE)
    workers = [create_app(sandbox=Sandbox.open(settings)).test_client() for _ in range(2)]
    Sandbox.open(settings).smart.register_app(
        SmartApp("two-workers-app", "Two workers", (REDIRECT,), "http://app.test/launch", "")
    )
    Sandbox.open(settings).store.update({"resourceType": "Patient", "id": "p1"})
    url = f"/auth/authorize?{authorize_query()}"
    form_page = workers[0].get(url)
    assert form_page.status_code == 200
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form_page.get_data(as_text=True))
    assert csrf is not None
    answer = workers[1].post(
        url,
        data={
            "csrf": csrf.group(1),
            "decision": "allow",
            "user": "Practitioner/sandbox-clinician",
            "patient": "p1",
            "grant_scope": "patient/Patient.rs",
        },
    )
    assert answer.status_code == 302, answer.get_data(as_text=True)
    location = urlsplit(answer.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    assert "code" in parse_qs(location.query)
    forged = workers[1].post(url, data={"csrf": "0" * 64, "decision": "allow"})
    assert "Form expired" in forged.get_data(as_text=True)


def _secret_in_child(path: str) -> bytes:
    return form_secret(Path(path))


def _key_in_child(path: str) -> str:
    return SigningKey.load_or_create(path).kid


def test_processes_starting_together_share_one_secret_and_one_key(tmp_path: Path) -> None:
    secret_file, key_file = tmp_path / "form-secret.bin", tmp_path / "key.jwk.json"
    with ProcessPoolExecutor(max_workers=4) as pool:
        secrets = set(pool.map(_secret_in_child, [str(secret_file)] * 8))
        kids = set(pool.map(_key_in_child, [str(key_file)] * 8))
    assert len(secrets) == 1 and len(next(iter(secrets))) == 32
    assert len(kids) == 1
    for made in (secret_file, key_file):
        assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["form-secret.bin", "key.jwk.json"]


def test_a_damaged_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    damaged = tmp_path / "form-secret.bin"
    damaged.write_bytes(b"short")
    with pytest.raises(ValueError, match="delete it"):
        form_secret(damaged)
