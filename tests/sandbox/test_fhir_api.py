"""Tests for the sandbox FHIR REST blueprint (Flask test client and a real socket server)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import flask
import pytest
import requests
from flask.testing import FlaskClient
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.web.fhir_api import MAX_BODY_BYTES, create_fhir_blueprint

FHIR_JSON = "application/fhir+json"
BASE = "http://localhost/fhir"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
MRN = "urn:oid:1.2.36.146.595.217.0.1"
DICOM_BYTES = b"\x00" * 128 + b"DICM" + bytes(range(256))


def make_app(store: FhirStore, **blueprint_kwargs: Any) -> flask.Flask:
    app = flask.Flask(__name__)
    app.register_blueprint(create_fhir_blueprint(store, **blueprint_kwargs), url_prefix="/fhir")
    return app


@pytest.fixture
def store(tmp_path: Path) -> FhirStore:
    return FhirStore(tmp_path / "fhir.db")


@pytest.fixture
def client(store: FhirStore) -> FlaskClient:
    return make_app(store).test_client()


def post(client: FlaskClient, path: str, resource: dict[str, Any], **headers: str) -> TestResponse:
    return client.post(path, data=json.dumps(resource), content_type=FHIR_JSON, headers=headers)


def put(client: FlaskClient, path: str, resource: dict[str, Any], **headers: str) -> TestResponse:
    return client.put(path, data=json.dumps(resource), content_type=FHIR_JSON, headers=headers)


def assert_outcome(response: TestResponse, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.data
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    body = response.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] in ("error", "fatal")
    assert issue["diagnostics"]
    if code is not None:
        assert issue["code"] == code
    assert "Traceback" not in response.get_data(as_text=True)


def no_nulls(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, dict):
        return all(no_nulls(v) for v in value.values())
    if isinstance(value, list):
        return all(no_nulls(v) for v in value)
    return True


def local(url: str) -> str:
    """Path and query of an absolute link, for the test client."""
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "http://localhost"
    return parts.path + ("?" + parts.query if parts.query else "")


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((lk["url"] for lk in bundle["link"] if lk["relation"] == relation), None)


# ------------------------------------------------------------------ metadata


def test_metadata_without_accept(client: FlaskClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    cap = response.get_json(force=True)
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"
    assert "json" in cap["format"]
    rest = cap["rest"][0]
    assert rest["mode"] == "server" and "security" not in rest
    by_type = {r["type"]: r for r in rest["resource"]}
    study = by_type["ImagingStudy"]
    assert {"read", "create", "update", "search-type"} <= {i["code"] for i in study["interaction"]}
    params = {p["name"]: p["type"] for p in study["searchParam"]}
    assert params["modality"] == "token" and params["started"] == "date"
    assert params["patient"] == "reference"
    assert {p["name"] for p in by_type["Patient"]["searchParam"]} >= {
        "identifier",
        "name",
        "family",
        "given",
        "birthdate",
        "gender",
    }
    assert "Binary" in by_type
    assert no_nulls(cap)
    assert_outcome(client.post("/fhir/metadata"), 405, "not-supported")


def test_metadata_security_slot(store: FhirStore) -> None:
    security = {"service": [{"text": "SMART-on-FHIR"}], "cors": True}
    client = make_app(store, capability_security=security).test_client()
    rest = client.get("/fhir/metadata").get_json(force=True)["rest"][0]
    assert rest["security"] == security


# ------------------------------------------------------------------ create / read / update


def test_create_and_read(client: FlaskClient) -> None:
    response = post(
        client, "/fhir/Patient", {"resourceType": "Patient", "id": "x", "gender": "male"}
    )
    assert response.status_code == 201
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    body = response.get_json(force=True)
    rid = body["id"]
    assert rid != "x"
    assert response.headers["Location"] == f"{BASE}/Patient/{rid}/_history/1"
    assert response.headers["ETag"] == 'W/"1"'
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"]

    read = client.get(f"/fhir/Patient/{rid}")
    assert read.status_code == 200
    assert read.get_json(force=True) == body
    assert read.headers["ETag"] == 'W/"1"'
    assert "Last-Modified" in read.headers
    assert client.get(f"/fhir/Patient/{rid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304


def test_read_missing_and_bad_type(client: FlaskClient) -> None:
    assert_outcome(client.get("/fhir/Patient/nope"), 404, "not-found")
    assert_outcome(client.get("/fhir/patient/1"), 404)
    assert_outcome(client.get("/fhir/Patient/1/2/3/4"), 404)
    assert_outcome(client.patch("/fhir/Patient/1"), 405)


def test_update_and_versions(client: FlaskClient) -> None:
    first = put(client, "/fhir/Patient/pat-1", {"resourceType": "Patient", "id": "pat-1"})
    assert first.status_code == 201
    assert first.headers["Location"] == f"{BASE}/Patient/pat-1/_history/1"
    second = put(
        client, "/fhir/Patient/pat-1", {"resourceType": "Patient", "id": "pat-1", "gender": "other"}
    )
    assert second.status_code == 200
    assert second.headers["ETag"] == 'W/"2"'
    assert second.get_json(force=True)["meta"]["versionId"] == "2"
    v1 = client.get("/fhir/Patient/pat-1/_history/1")
    assert v1.status_code == 200 and "gender" not in v1.get_json(force=True)
    assert client.get("/fhir/Patient/pat-1/_history/2").get_json(force=True)["gender"] == "other"
    assert_outcome(client.get("/fhir/Patient/pat-1/_history/9"), 404)
    history = client.get("/fhir/Patient/pat-1/_history").get_json(force=True)
    assert history["type"] == "history" and history["total"] == 2

    conflict = put(
        client,
        "/fhir/Patient/pat-1",
        {"resourceType": "Patient", "id": "pat-1"},
        **{"If-Match": 'W/"1"'},
    )
    assert_outcome(conflict, 412, "conflict")
    ok = put(
        client,
        "/fhir/Patient/pat-1",
        {"resourceType": "Patient", "id": "pat-1"},
        **{"If-Match": 'W/"2"'},
    )
    assert ok.status_code == 200


def test_update_id_rules(client: FlaskClient) -> None:
    assert_outcome(put(client, "/fhir/Patient/a", {"resourceType": "Patient", "id": "b"}), 400)
    assert_outcome(put(client, "/fhir/Patient/a", {"resourceType": "Patient"}), 400)
    assert_outcome(put(client, "/fhir/Patient/a_b", {"resourceType": "Patient", "id": "a_b"}), 400)


def test_delete(client: FlaskClient) -> None:
    put(client, "/fhir/Patient/gone", {"resourceType": "Patient", "id": "gone"})
    assert client.delete("/fhir/Patient/gone").status_code == 204
    assert_outcome(client.get("/fhir/Patient/gone"), 410, "deleted")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "structure"),
        (b"[1, 2]", "structure"),
        (b"", "required"),
        (b'{"gender": "male"}', "required"),
        (b'{"resourceType": "Observation"}', "invalid"),
        (b"\xff\xfe\x00garbage", "structure"),
        (b'{"resourceType": "Patient", "meta": []}', "invalid"),
    ],
)
def test_bad_bodies(client: FlaskClient, data: bytes, code: str) -> None:
    assert_outcome(client.post("/fhir/Patient", data=data, content_type=FHIR_JSON), 400, code)


def test_wrong_type_on_update(client: FlaskClient) -> None:
    response = put(client, "/fhir/Patient/a", {"resourceType": "Observation", "id": "a"})
    assert_outcome(response, 400, "invalid")


def test_body_too_large(client: FlaskClient) -> None:
    data = b" " * (MAX_BODY_BYTES + 1)
    assert_outcome(client.post("/fhir/Patient", data=data, content_type=FHIR_JSON), 413, "too-long")


def test_internal_errors_are_outcomes(store: FhirStore, monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_app(store).test_client()

    def boom(*args: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(store, "read", boom)
    response = client.get("/fhir/Patient/x")
    assert_outcome(response, 500, "exception")
    assert "secret internals" not in response.get_data(as_text=True)


def test_unknown_resource_type_is_accepted(client: FlaskClient) -> None:
    made = post(client, "/fhir/Basic", {"resourceType": "Basic", "code": {"text": "x"}})
    assert made.status_code == 201
    rid = made.get_json(force=True)["id"]
    assert client.get(f"/fhir/Basic?_id={rid}").get_json(force=True)["total"] == 1


def test_nulls_never_emitted(client: FlaskClient) -> None:
    made = post(
        client, "/fhir/Patient", {"resourceType": "Patient", "gender": None, "name": [None]}
    )
    body = made.get_json(force=True)
    assert no_nulls(body) and "gender" not in body


def test_configured_base_url(store: FhirStore) -> None:
    app = make_app(store)
    app.config["FHIR_BASE_URL"] = "https://ehr.example/fhir/"
    client = app.test_client()
    made = post(client, "/fhir/Patient", {"resourceType": "Patient"})
    rid = made.get_json(force=True)["id"]
    assert made.headers["Location"] == f"https://ehr.example/fhir/Patient/{rid}/_history/1"
    bundle = client.get("/fhir/Patient").get_json(force=True)
    assert bundle["entry"][0]["fullUrl"] == f"https://ehr.example/fhir/Patient/{rid}"
    assert link(bundle, "self") == "https://ehr.example/fhir/Patient?_count=50"


def test_prefer_return_minimal(client: FlaskClient) -> None:
    made = post(client, "/fhir/Patient", {"resourceType": "Patient"}, Prefer="return=minimal")
    assert made.status_code == 201 and made.data == b"" and made.headers["Location"]


# ------------------------------------------------------------------ conditional create


def test_conditional_create_via_header(client: FlaskClient) -> None:
    pat = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "7"}]}
    header = {"If-None-Exist": f"identifier={MRN}|7"}
    first = post(client, "/fhir/Patient", pat, **header)
    assert first.status_code == 201
    second = post(client, "/fhir/Patient", pat, **header)
    assert second.status_code == 200
    assert second.get_json(force=True)["id"] == first.get_json(force=True)["id"]
    assert client.get("/fhir/Patient?_summary=count").get_json(force=True)["total"] == 1
    assert post(client, "/fhir/Patient", pat).status_code == 201  # unconditional duplicate
    assert_outcome(post(client, "/fhir/Patient", pat, **header), 412, "multiple-matches")
    assert_outcome(post(client, "/fhir/Patient", pat, **{"If-None-Exist": "bogus=1"}), 400)
    assert client.get("/fhir/Patient?_summary=count").get_json(force=True)["total"] == 2


@pytest.fixture
def live_server(store: FhirStore) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, make_app(store), threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/fhir"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_conditional_create_concurrent_over_http(live_server: str, store: FhirStore) -> None:
    n = 16
    barrier = threading.Barrier(n)
    statuses: list[int] = []
    rids: list[str] = []
    errors: list[BaseException] = []
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}],
    }

    def worker() -> None:
        try:
            with requests.Session() as session:
                barrier.wait()
                response = session.post(
                    f"{live_server}/ImagingStudy",
                    data=json.dumps(study),
                    headers={
                        "Content-Type": FHIR_JSON,
                        "If-None-Exist": "identifier=urn:dicom:uid|urn:oid:1.2.3.4",
                    },
                    timeout=30,
                )
            statuses.append(response.status_code)
            rids.append(response.json()["id"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(statuses) == [200] * (n - 1) + [201]
    assert len(set(rids)) == 1
    assert store.count("ImagingStudy") == 1

    bundle = requests.get(
        f"{live_server}/ImagingStudy", params={"identifier": "urn:oid:1.2.3.4"}, timeout=10
    ).json()
    assert bundle["total"] == 1
    assert bundle["entry"][0]["fullUrl"] == f"{live_server}/ImagingStudy/{rids[0]}"


# ------------------------------------------------------------------ search


@pytest.fixture
def seeded(client: FlaskClient) -> FlaskClient:
    for i in range(23):
        resource = {
            "resourceType": "ImagingStudy",
            "id": f"s{i:02d}",
            "status": "available" if i % 3 else "registered",
            "subject": {"reference": f"Patient/p{i % 4}"},
            "started": f"2024-05-{i + 1:02d}T09:00:00Z",
            "series": [
                {"uid": f"1.2.{i}", "modality": {"system": DCM, "code": "CR" if i % 2 else "DX"}}
            ],
        }
        assert put(client, f"/fhir/ImagingStudy/s{i:02d}", resource).status_code == 201
    return client


def search_ids(client: FlaskClient, url: str) -> list[str]:
    bundle = client.get(url).get_json(force=True)
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def test_search_bundle_shape(seeded: FlaskClient) -> None:
    response = seeded.get("/fhir/ImagingStudy?patient=Patient/p1&modality=CR")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    bundle = response.get_json(force=True)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == 6
    assert link(bundle, "self") == f"{BASE}/ImagingStudy?patient=Patient/p1&modality=CR&_count=50"
    assert link(bundle, "next") is None
    for entry in bundle["entry"]:
        assert entry["search"] == {"mode": "match"}
        assert entry["fullUrl"] == f"{BASE}/ImagingStudy/{entry['resource']['id']}"
        assert entry["resource"]["subject"]["reference"] == "Patient/p1"
    assert no_nulls(bundle)
    empty = seeded.get("/fhir/ImagingStudy?patient=nobody").get_json(force=True)
    assert empty["total"] == 0 and "entry" not in empty


def test_search_params_over_http(seeded: FlaskClient) -> None:
    assert search_ids(seeded, "/fhir/ImagingStudy?started=2024-05-03") == ["s02"]
    assert search_ids(seeded, "/fhir/ImagingStudy?started=ge2024-05-21&_sort=-started") == [
        "s22",
        "s21",
        "s20",
    ]
    assert search_ids(seeded, "/fhir/ImagingStudy?started=lt2024-05-03") == ["s00", "s01"]
    url = "/fhir/ImagingStudy?started=2024-05-02T11:00:00%2B02:00"
    assert search_ids(seeded, url) == ["s01"]
    assert len(search_ids(seeded, "/fhir/ImagingStudy?modality=CR,DX")) == 23
    assert len(search_ids(seeded, f"/fhir/ImagingStudy?modality={DCM}|DX")) == 12
    assert search_ids(
        seeded, "/fhir/ImagingStudy?subject=http://elsewhere/fhir/Patient/p3&status=registered"
    ) == [
        "s03",
        "s15",
    ]
    assert search_ids(seeded, "/fhir/ImagingStudy?_id=s05,s07") == ["s05", "s07"]
    assert_outcome(seeded.get("/fhir/ImagingStudy?started=notadate"), 400, "invalid")
    assert_outcome(seeded.get("/fhir/ImagingStudy?_count=many"), 400)


def test_unknown_params_ignored_and_not_echoed(seeded: FlaskClient) -> None:
    bundle = seeded.get("/fhir/ImagingStudy?foo=bar&status=registered&_include=x").get_json(
        force=True
    )
    assert bundle["total"] == 8
    assert link(bundle, "self") == f"{BASE}/ImagingStudy?status=registered&_count=50"
    strict = seeded.get("/fhir/ImagingStudy?foo=bar", headers={"Prefer": "handling=strict"})
    assert_outcome(strict, 400, "not-supported")
    lenient = seeded.get(
        "/fhir/ImagingStudy?status=registered", headers={"Prefer": "handling=strict"}
    )
    assert lenient.status_code == 200


def test_paging_follows_next_links(seeded: FlaskClient) -> None:
    url: str | None = "/fhir/ImagingStudy?_count=5&_sort=-started&patient=p0,p1,p2,p3"
    seen: list[str] = []
    pages = 0
    while url:
        bundle = seeded.get(url).get_json(force=True)
        assert bundle["total"] == 23
        assert len(bundle.get("entry", [])) <= 5
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        pages += 1
        nxt = link(bundle, "next")
        if nxt is not None:
            assert "_offset=" in nxt and "_sort=-started" in nxt and "_count=5" in nxt
        url = local(nxt) if nxt else None
    assert pages == 5
    assert len(seen) == len(set(seen)) == 23
    assert seen == sorted(seen, reverse=True)


def test_paging_default_order_without_sort(seeded: FlaskClient) -> None:
    url: str | None = "/fhir/ImagingStudy?_count=10"
    seen: list[str] = []
    while url:
        bundle = seeded.get(url).get_json(force=True)
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        nxt = link(bundle, "next")
        url = local(nxt) if nxt else None
        if url:
            prev = link(seeded.get(url).get_json(force=True), "previous")
            assert prev is not None
    assert seen == [f"s{i:02d}" for i in range(23)]


def test_summary_count(seeded: FlaskClient) -> None:
    bundle = seeded.get("/fhir/ImagingStudy?_summary=count&modality=CR").get_json(force=True)
    assert bundle["total"] == 11
    assert "entry" not in bundle
    assert link(bundle, "next") is None
    assert "_summary=count" in (link(bundle, "self") or "")


def test_post_search_merges_form_and_query(seeded: FlaskClient) -> None:
    response = seeded.post(
        "/fhir/ImagingStudy/_search?modality=CR",
        data={"patient": "Patient/p1", "_count": "2"},
    )
    assert response.status_code == 200
    bundle = response.get_json(force=True)
    assert bundle["total"] == 6
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["s01", "s05"]
    nxt = link(bundle, "next")
    assert nxt is not None and "patient=Patient/p1" in nxt and "modality=CR" in nxt
    assert search_ids(seeded, local(nxt)) == ["s09", "s13"]
    bad = seeded.post("/fhir/ImagingStudy/_search", data="{}", content_type="application/json")
    assert_outcome(bad, 415)


def test_pretty_output(seeded: FlaskClient) -> None:
    text = seeded.get("/fhir/ImagingStudy/s01?_pretty=true").get_data(as_text=True)
    assert text.startswith("{\n")


# ------------------------------------------------------------------ Binary


def test_binary_raw_and_json(client: FlaskClient) -> None:
    made = client.post("/fhir/Binary", data=DICOM_BYTES, content_type="application/dicom")
    assert made.status_code == 201
    body = made.get_json(force=True)
    assert body["resourceType"] == "Binary" and body["contentType"] == "application/dicom"
    assert base64.b64decode(body["data"]) == DICOM_BYTES
    rid = body["id"]
    assert made.headers["Location"] == f"{BASE}/Binary/{rid}/_history/1"

    raw = client.get(f"/fhir/Binary/{rid}", headers={"Accept": "application/dicom"})
    assert raw.status_code == 200
    assert raw.headers["Content-Type"] == "application/dicom"
    assert raw.data == DICOM_BYTES

    for accept in (None, FHIR_JSON, "application/json", "*/*", "application/fhir+json, */*;q=0.1"):
        headers = {"Accept": accept} if accept else {}
        res = client.get(f"/fhir/Binary/{rid}", headers=headers)
        assert res.status_code == 200, accept
        assert res.headers["Content-Type"].startswith(FHIR_JSON), accept
        assert base64.b64decode(res.get_json(force=True)["data"]) == DICOM_BYTES

    preferred = client.get(
        f"/fhir/Binary/{rid}", headers={"Accept": "application/dicom, application/fhir+json;q=0.5"}
    )
    assert preferred.data == DICOM_BYTES
    assert_outcome(client.get(f"/fhir/Binary/{rid}", headers={"Accept": "image/png"}), 406)


def test_binary_json_post_and_put_raw(client: FlaskClient) -> None:
    payload = base64.b64encode(b"hello").decode()
    made = post(
        client,
        "/fhir/Binary",
        {"resourceType": "Binary", "contentType": "text/plain", "data": payload},
    )
    assert made.status_code == 201
    rid = made.get_json(force=True)["id"]
    raw = client.get(f"/fhir/Binary/{rid}", headers={"Accept": "text/plain"})
    assert raw.data == b"hello" and raw.headers["Content-Type"].startswith("text/plain")
    assert raw.headers["X-Content-Type-Options"] == "nosniff"

    replaced = client.put("/fhir/Binary/img-1", data=b"\x89PNG", content_type="image/png")
    assert replaced.status_code == 201
    assert client.get("/fhir/Binary/img-1", headers={"Accept": "image/png"}).data == b"\x89PNG"
    bad = post(
        client, "/fhir/Binary", {"resourceType": "Binary", "contentType": "x/y", "data": "!!"}
    )
    assert_outcome(bad, 400)
