"""ImagePipelineBackend: outcomes for every kind of image problem, and the worker's retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cds_service.imaging.errors import ImageFetchError, NotAnalysable, UnsupportedImage
from cds_service.imaging.files import DecodedImage, read_image_file
from cds_service.imaging.selection import Selection, best
from cds_service.inference.base import ReportRequest, SourceAwareBackend
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SimulatedBackend, SimulatedReportWriter
from cds_service.jobs.worker import MAX_ATTEMPTS, process_one
from cds_service.storage.ports import StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from tests.imaging.conftest import seed_file

STUDY = {"resourceType": "ImagingStudy", "id": "s1", "started": "2026-01-02T03:04:05+00:00"}


class Source:
    def __init__(self, outcome: DecodedImage | Exception) -> None:
        self.outcome = outcome
        self.calls: list[str | None] = []

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        self.calls.append(fhir_server)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def film() -> DecodedImage:
    return read_image_file(seed_file("nih-cxr14-00000002_000-no-finding-dx.dcm"))


def test_completed_result_carries_report_findings_and_image_notes() -> None:
    source = Source(film())
    backend = ImagePipelineBackend(SimulatedReportWriter(), source)
    result = backend.analyse_from("1.2.3", STUDY, "http://ehr/fhir")
    assert source.calls == ["http://ehr/fhir"]
    assert result.status == "completed" and result.model.simulated
    assert result.report_text.startswith("SIMULATED OUTPUT")
    assert result.study_started == STUDY["started"]
    assert result.extra["image_notes"] == ["no window: stored 8-bit values"]
    assert result.findings  # the labeler ran on the text


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NotAnalysable("lateral view"), "lateral view"),
        (NotAnalysable("modality CT"), "modality CT"),
        (UnsupportedImage("pixel data are truncated"), "image cannot be read: pixel data are"),
    ],
)
def test_image_problems_become_not_analysed_with_the_reason(error: Exception, reason: str) -> None:
    result = ImagePipelineBackend(SimulatedReportWriter(), Source(error)).analyse("1.2.3", STUDY)
    assert result.status == "not-analysed"
    assert result.reason.startswith(reason)
    assert not result.findings and not result.report_text


def test_network_failures_are_retried_by_the_worker(tmp_path: Path) -> None:
    source = Source(ImageFetchError("image server unreachable (ConnectionError)"))
    backend = ImagePipelineBackend(SimulatedReportWriter(), source)
    assert isinstance(backend, SourceAwareBackend)
    assert not isinstance(SimulatedBackend(), SourceAwareBackend)
    store = open_sqlite_storage(tmp_path / "jobs.sqlite3")
    ref = StudyRef("http://ehr", "1.2.3", "p1")
    store.jobs.enqueue(ref, backend.model, STUDY, "http://ehr/fhir")
    for _ in range(MAX_ATTEMPTS):
        assert process_one(store, backend)
        store.jobs.release_waiting()  # skip the pause before the next attempt
    stored = store.results.get_result(ref, backend.model)
    assert stored is not None and stored.result.status == "failed"
    assert source.calls == ["http://ehr/fhir"] * MAX_ATTEMPTS


def test_simulated_writer_is_deterministic_per_image() -> None:
    writer = SimulatedReportWriter()
    image = film().pixels
    other = np.ascontiguousarray(image[::-1])
    texts = writer.write_reports([ReportRequest(image), ReportRequest(image), ReportRequest(other)])
    assert texts[0] == texts[1]
    assert all(t.startswith("SIMULATED OUTPUT") for t in texts)


def test_best_prefers_pa_then_the_largest() -> None:
    ap_big = Selection(True, "ok", "DX", "CHEST", "AP", pixels=9_000_000)
    pa_small = Selection(True, "ok", "CR", "CHEST", "PA", pixels=1_000_000)
    pa_big = Selection(True, "ok", "CR", "CHEST", "PA", pixels=4_000_000)
    lateral = Selection(False, "lateral view", "CR", "CHEST", "LL", pixels=99_000_000)
    assert best([(ap_big, "ap"), (pa_small, "pa1"), (lateral, "lat"), (pa_big, "pa2")]) == "pa2"
    assert best([(ap_big, "ap"), (lateral, "lat")]) == "ap"
    with pytest.raises(NotAnalysable, match="^not analysed: lateral view$"):
        best([(lateral, "lat"), (lateral, "lat2")])
