"""The storage ports' documented behaviour (cds_service.storage.ports), driven through each
adapter: SQLite and PostgreSQL must be interchangeable for every consumer."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

from cds_service.findings.observations import Observation
from cds_service.results import AnalysisResult, CardRecord, Finding, ModelInfo
from cds_service.storage.ports import (
    JOB_STATES,
    ImageTooLarge,
    Job,
    QueueFull,
    Storage,
    StudyRef,
)
from tests.storage.conftest import OpenStorage

MODEL = ModelInfo("cxr-test", "v1")
NEXT_VERSION = ModelInfo("cxr-test", "v2")
EHR_A = "https://ehr-a.example/fhir"
EHR_B = "https://ehr-b.example/fhir"
STUDY: dict[str, Any] = {
    "resourceType": "ImagingStudy",
    "id": "s1",
    "started": "2026-11-20T10:00:00+00:00",
    "series": [{"uid": "1.2.3.1", "modality": {"code": "DX"}}],
}
DICOM = bytes(range(256)) * 4096  # 1 MiB, every byte value


def ref(uid: str, source: str = EHR_A, patient: str | None = "p1") -> StudyRef:
    return StudyRef(source, uid, patient)


def result(
    uid: str, status: str = "completed", reason: str = "", model: ModelInfo = MODEL
) -> AnalysisResult:
    return AnalysisResult(
        uid,
        model,
        status,  # type: ignore[arg-type]
        report_text="No acute cardiopulmonary process." if status == "completed" else "",
        reason=reason,
    )


def claim_one(storage: Storage, model: ModelInfo = MODEL, **kwargs: Any) -> Job:
    jobs = storage.jobs.claim_batch(model, 1, **kwargs)
    assert len(jobs) == 1, jobs
    return jobs[0]


def counts(storage: Storage, model: ModelInfo = MODEL, **nonzero: int) -> dict[str, int]:
    expected = dict.fromkeys(JOB_STATES, 0)
    expected.update(nonzero)
    return expected


# -- enqueue ---------------------------------------------------------------------------------


def test_enqueue_is_idempotent_per_study_source_and_model_version(storage: Storage) -> None:
    jobs = storage.jobs
    assert jobs.enqueue(ref("1.1"), MODEL, STUDY, EHR_A)
    assert not jobs.enqueue(ref("1.1"), MODEL, STUDY, EHR_A)
    assert not jobs.enqueue(ref("1.1", patient=None), MODEL, {"other": 1}, None)
    assert jobs.enqueue(ref("1.1"), NEXT_VERSION, STUDY, EHR_A)  # another model version
    assert jobs.enqueue(ref("1.1", source=EHR_B), MODEL, STUDY, EHR_B)  # another source
    assert jobs.queue_depth(MODEL) == 2
    assert jobs.queue_depth(NEXT_VERSION) == 1
    assert jobs.job_state(ref("1.1"), MODEL) == "queued"

    job = claim_one(storage)
    assert job.ref == ref("1.1")
    assert jobs.job_state(ref("1.1"), MODEL) == "running"
    assert not jobs.enqueue(ref("1.1"), MODEL, STUDY, EHR_A)  # running is live too
    jobs.finish(job, result("1.1"))
    assert jobs.job_state(ref("1.1"), MODEL) is None
    first = jobs.latest_job_id(ref("1.1"), MODEL)
    # Closed: the study may be queued again (a new job).
    assert jobs.enqueue(ref("1.1"), MODEL, STUDY, EHR_A)
    latest = jobs.latest_job_id(ref("1.1"), MODEL)
    assert first is not None and latest is not None and latest > first


def test_source_is_canonical_whoever_spells_it(storage: Storage) -> None:
    assert storage.jobs.enqueue(ref("1.1", source=EHR_A + "/"), MODEL, STUDY, EHR_A)
    assert not storage.jobs.enqueue(ref("1.1", source=EHR_A), MODEL, STUDY, EHR_A)


def test_concurrent_enqueues_of_one_study_make_one_job(open_storage: OpenStorage) -> None:
    # Each thread its own Storage (its own connections): like separate web replicas.
    stores = [open_storage() for _ in range(6)]
    start = threading.Barrier(len(stores))
    created: list[bool] = []
    lock = threading.Lock()

    def enqueue(store: Storage) -> None:
        start.wait()
        outcome = store.jobs.enqueue(ref("9.9"), MODEL, STUDY, EHR_A)
        with lock:
            created.append(outcome)

    threads = [threading.Thread(target=enqueue, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(created) == [False] * 5 + [True]
    assert stores[0].jobs.queue_depth(MODEL) == 1


def test_full_queue_refuses_per_model_version(open_storage: OpenStorage) -> None:
    storage = open_storage(max_queue=2)
    jobs = storage.jobs
    assert jobs.enqueue(ref("1"), MODEL, STUDY, None)
    assert jobs.enqueue(ref("2"), MODEL, STUDY, None)
    with pytest.raises(QueueFull, match="limit 2"):
        jobs.enqueue(ref("3"), MODEL, STUDY, None)
    with pytest.raises(QueueFull):  # the limit is checked first, even for a live study
        jobs.enqueue(ref("1"), MODEL, STUDY, None)
    assert jobs.queue_depth(MODEL) == 2
    assert jobs.enqueue(ref("3"), NEXT_VERSION, STUDY, None)  # another version's queue
    # Running jobs count; closed ones make room.
    job = claim_one(storage)
    with pytest.raises(QueueFull):
        jobs.enqueue(ref("3"), MODEL, STUDY, None)
    jobs.finish(job, result(job.ref.study_uid))
    assert jobs.enqueue(ref("3"), MODEL, STUDY, None)


def test_an_image_over_the_limit_queues_nothing(storage: Storage) -> None:
    with pytest.raises(ImageTooLarge, match="1001 bytes"):
        storage.jobs.enqueue(ref("1"), MODEL, STUDY, None, b"x" * 1001, max_dicom_bytes=1000)
    assert storage.jobs.queue_depth(MODEL) == 0
    assert storage.jobs.latest_job_id(ref("1"), MODEL) is None
    assert storage.jobs.enqueue(ref("1"), MODEL, STUDY, None, b"x" * 1000, max_dicom_bytes=1000)


def test_a_job_keeps_its_image_until_closed(storage: Storage) -> None:
    jobs = storage.jobs
    assert jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A, DICOM)
    assert jobs.enqueue(ref("2"), MODEL, STUDY, EHR_A)
    first, second = jobs.claim_batch(MODEL, 2)
    assert first.dicom == DICOM and second.dicom is None
    # Queued again after a failure: the image stays with it.
    jobs.fail(first, "transient")
    assert claim_one(storage).dicom == DICOM
    # Closed: the image is gone, and a requeue of the same job runs without it.
    jobs.fail(first, "broken", final=result("1", "failed", "broken"))
    assert jobs.requeue(MODEL) == 1
    again = claim_one(storage)
    assert again.id == first.id and again.dicom is None


def test_an_image_reaches_a_live_job_without_one(storage: Storage) -> None:
    jobs = storage.jobs
    assert jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A)
    jobs.defer(claim_one(storage), "no access to the EHR", 3600)
    assert jobs.waiting_reason(ref("1"), MODEL) == "no access to the EHR"
    assert not jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A, DICOM)  # no second job...
    assert jobs.waiting_reason(ref("1"), MODEL) is None  # ...but it waits no longer
    assert jobs.job_counts(MODEL) == counts(storage, queued=1)
    assert not jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A, b"another image")  # keeps the first
    job = claim_one(storage)
    assert job.dicom == DICOM and job.attempts == 1


# -- claims and leases -----------------------------------------------------------------------


def test_claim_batch_takes_the_oldest_up_to_the_limit(storage: Storage) -> None:
    jobs = storage.jobs
    before = time.time()
    for number in range(5):
        jobs.enqueue(ref(f"1.{number}"), MODEL, STUDY, EHR_A)
    jobs.enqueue(ref("other"), NEXT_VERSION, STUDY, EHR_A)
    with pytest.raises(ValueError):
        jobs.claim_batch(MODEL, 0)
    batch = jobs.claim_batch(MODEL, 3, owner="w1")
    assert [j.ref.study_uid for j in batch] == ["1.0", "1.1", "1.2"]
    assert [j.id for j in batch] == sorted(j.id for j in batch)
    assert all(j.attempts == 1 and j.model == MODEL for j in batch)
    assert all(before - 1 <= j.created_at <= time.time() + 1 for j in batch)
    assert [j.ref.study_uid for j in jobs.claim_batch(MODEL, 10)] == ["1.3", "1.4"]
    assert jobs.claim_batch(MODEL, 10) == []
    assert jobs.claim(MODEL) is None
    assert jobs.job_counts(MODEL) == counts(storage, running=5)
    other = jobs.claim(NEXT_VERSION)
    assert other is not None and other.ref.study_uid == "other"


def test_a_claimed_job_carries_what_was_queued(storage: Storage) -> None:
    study = {**STUDY, "note": "é ✓ \u0000", "nested": {"list": [1, 2.5, None, True]}}
    storage.jobs.enqueue(ref("1", patient="pat-7"), MODEL, study, EHR_B + "/")
    job = storage.jobs.claim(MODEL)
    assert job is not None
    assert job.ref == StudyRef(EHR_A, "1", "pat-7")
    assert job.fhir_server == EHR_B + "/"  # kept as given
    assert job.study_resource == study
    assert job.dicom is None


def test_a_lease_left_unrenewed_goes_to_the_next_claim(storage: Storage) -> None:
    storage.jobs.enqueue(ref("1"), MODEL, STUDY, None)
    job = claim_one(storage, owner="dead-worker")
    assert storage.jobs.claim_batch(MODEL, 1, stale_after_s=60) == []
    time.sleep(0.15)
    again = claim_one(storage, stale_after_s=0.1, owner="next-worker")
    assert again.id == job.id and again.attempts == 2


def test_a_renewed_lease_is_kept_by_its_owner(storage: Storage) -> None:
    jobs = storage.jobs
    jobs.enqueue(ref("1"), MODEL, STUDY, None)
    jobs.enqueue(ref("2"), MODEL, STUDY, None)
    mine = claim_one(storage, owner="alive")
    theirs = claim_one(storage, owner="dead")
    time.sleep(0.3)
    jobs.renew_leases("alive")
    reclaimed = jobs.claim_batch(MODEL, 5, stale_after_s=0.25, owner="next")
    assert [j.id for j in reclaimed] == [theirs.id]  # only the unrenewed one
    time.sleep(0.3)
    jobs.renew_leases("next")  # another owner's renewal keeps only its own jobs
    assert [j.id for j in jobs.claim_batch(MODEL, 5, stale_after_s=0.25)] == [mine.id]


def test_concurrent_claims_never_share_a_job(open_storage: OpenStorage) -> None:
    producer = open_storage()
    for number in range(60):
        producer.jobs.enqueue(ref(f"c.{number}"), MODEL, STUDY, None)
    workers = [open_storage() for _ in range(3)]
    start = threading.Barrier(len(workers))
    taken: dict[int, list[int]] = {}

    def work(index: int, store: Storage) -> None:
        start.wait()
        mine: list[int] = []
        while batch := store.jobs.claim_batch(MODEL, 4, owner=f"w{index}"):
            mine.extend(job.id for job in batch)
        taken[index] = mine

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    every = [job_id for ids in taken.values() for job_id in ids]
    assert len(every) == len(set(every)) == 60


# -- closing jobs ----------------------------------------------------------------------------


def test_finish_stores_the_result_and_closes_the_job_together(storage: Storage) -> None:
    jobs = storage.jobs
    jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A)
    job = claim_one(storage)
    jobs.finish(job, result("1"), filed_location="DiagnosticReport/7/_history/1")
    stored = storage.results.get_result(ref("1"), MODEL)
    assert stored is not None
    assert stored.result == result("1")
    assert stored.patient_id == "p1"
    assert stored.filed_location == "DiagnosticReport/7/_history/1"
    analysis = jobs.analysis(job.id)
    assert analysis is not None
    assert (analysis.job_status, analysis.reason) == ("done", None)
    assert analysis.result == result("1")
    assert analysis.filed_location == "DiagnosticReport/7/_history/1"
    assert jobs.job_counts(MODEL) == counts(storage, done=1)
    assert jobs.queue_depth(MODEL) == 0
    assert jobs.claim(MODEL) is None


def test_fail_queues_again_after_retry_in_s(storage: Storage) -> None:
    jobs = storage.jobs
    jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A)
    job = claim_one(storage)
    jobs.fail(job, "EHR timed out " + "x" * 1000, retry_in_s=3600)
    assert jobs.claim(MODEL) is None
    assert jobs.job_counts(MODEL) == counts(storage, waiting=1)
    analysis = jobs.analysis(job.id)
    assert analysis is not None and analysis.job_status == "waiting"
    assert analysis.reason is not None and len(analysis.reason) == 500
    assert analysis.reason.startswith("EHR timed out")
    assert jobs.queue_depth(MODEL) == 1  # still live
    assert jobs.release_waiting() == 1
    again = claim_one(storage)
    assert again.id == job.id and again.attempts == 2  # a failure counts
    jobs.fail(again, "once more")  # no wait: claimable at once
    assert claim_one(storage).attempts == 3
    assert storage.results.get_result(ref("1"), MODEL) is None


def test_fail_with_a_final_result_closes_the_job(storage: Storage) -> None:
    jobs = storage.jobs
    jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A)
    job = claim_one(storage)
    final = result("1", "failed", "analysis failed after repeated errors")
    jobs.fail(job, "decoder crashed", final=final, retry_in_s=60)
    analysis = jobs.analysis(job.id)
    assert analysis is not None
    assert (analysis.job_status, analysis.reason) == ("failed", "decoder crashed")
    assert analysis.result == final
    stored = storage.results.get_result(ref("1"), MODEL)
    assert stored is not None and stored.result.status == "failed"
    assert jobs.job_counts(MODEL) == counts(storage, failed=1)
    assert jobs.claim(MODEL) is None


def test_put_back_gives_the_attempt_back(storage: Storage) -> None:
    jobs = storage.jobs
    jobs.enqueue(ref("1"), MODEL, STUDY, None)
    job = claim_one(storage)
    jobs.put_back(job, "the model is unavailable")
    assert jobs.waiting_reason(ref("1"), MODEL) is None  # not waiting: claimable now
    again = claim_one(storage)
    assert again.id == job.id and again.attempts == 1


def test_defer_waits_uncounted_until_released(storage: Storage) -> None:
    jobs = storage.jobs
    jobs.enqueue(ref("1"), MODEL, STUDY, EHR_A)
    jobs.enqueue(ref("2"), MODEL, STUDY, EHR_A)
    job = claim_one(storage)
    jobs.defer(job, "no access to https://ehr-a.example/fhir", 3600)
    assert jobs.waiting_reason(ref("1"), MODEL) == "no access to https://ehr-a.example/fhir"
    assert jobs.waiting_reason(ref("2"), MODEL) is None  # queued, not waiting
    assert jobs.waiting_reason(ref("3"), MODEL) is None  # no job
    analysis = jobs.analysis(job.id)
    assert analysis is not None
    assert (analysis.job_status, analysis.reason) == (
        "waiting",
        "no access to https://ehr-a.example/fhir",
    )
    assert jobs.job_counts(MODEL) == counts(storage, queued=1, waiting=1)
    assert claim_one(storage).ref.study_uid == "2"  # the waiting one is not claimable
    assert jobs.release_waiting() == 1
    assert jobs.release_waiting() == 0
    again = claim_one(storage)
    assert again.id == job.id and again.attempts == 1


def test_a_short_defer_ends_by_itself(storage: Storage) -> None:
    storage.jobs.enqueue(ref("1"), MODEL, STUDY, None)
    storage.jobs.defer(claim_one(storage), "later", 0.2)
    assert storage.jobs.claim(MODEL) is None
    time.sleep(0.3)
    assert storage.jobs.waiting_reason(ref("1"), MODEL) is None
    assert claim_one(storage).ref.study_uid == "1"


def test_defer_leaves_a_job_that_is_not_running(storage: Storage) -> None:
    storage.jobs.enqueue(ref("1"), MODEL, STUDY, None)
    job = claim_one(storage)
    storage.jobs.finish(job, result("1"))
    storage.jobs.defer(job, "too late", 60)
    storage.jobs.put_back(job, "too late")
    assert storage.jobs.job_counts(MODEL) == counts(storage, done=1)


# -- requeue ---------------------------------------------------------------------------------


def analysed(storage: Storage) -> dict[str, int]:
    """Five studies analysed: completed, not analysed (two reasons, two EHRs), failed; and a
    not-analysed result stored by hand (no job). Returns each study's job id."""
    outcomes = {
        "film": (EHR_A, result("film")),
        "lateral": (EHR_A, result("lateral", "not-analysed", "Lateral view only")),
        "pediatric": (EHR_B, result("pediatric", "not-analysed", "patient under 18")),
        "broken": (EHR_B, result("broken", "failed", "decoder crashed")),
    }
    ids = {}
    for uid, (server, outcome) in outcomes.items():
        storage.jobs.enqueue(ref(uid, source=server), MODEL, STUDY, server)
        job = claim_one(storage)
        if outcome.status == "completed":
            storage.jobs.finish(job, outcome)
        else:
            storage.jobs.fail(job, outcome.reason, final=outcome)
        ids[uid] = job.id
    storage.results.put_result(ref("by-hand"), result("by-hand", "not-analysed", "lateral"))
    return ids


def test_requeue_filters(storage: Storage) -> None:
    analysed(storage)
    requeue = storage.jobs.requeue
    assert requeue(MODEL, dry_run=True) == 3  # never completed; by-hand has no job
    assert requeue(MODEL, statuses=("failed",), dry_run=True) == 1
    assert requeue(MODEL, statuses=("not-analysed",), dry_run=True) == 2
    assert requeue(MODEL, study_uid="lateral", dry_run=True) == 1
    assert requeue(MODEL, study_uid="film", dry_run=True) == 0
    assert requeue(MODEL, reason="LATERAL", dry_run=True) == 1  # any case, part of it
    assert requeue(MODEL, reason="under 18", statuses=("failed",), dry_run=True) == 0
    assert requeue(MODEL, fhir_server=EHR_B, dry_run=True) == 2
    assert requeue(MODEL, fhir_server=EHR_B + "/", dry_run=True) == 2  # same base
    assert requeue(MODEL, fhir_server="https://elsewhere.example/fhir", dry_run=True) == 0
    assert requeue(NEXT_VERSION, dry_run=True) == 0
    for wrong in ((), ("completed",), ("failed", "completed")):
        with pytest.raises(ValueError):
            requeue(MODEL, statuses=wrong)
    # A dry run changed nothing.
    assert storage.jobs.queue_depth(MODEL) == 0
    assert storage.results.get_result(ref("lateral"), MODEL) is not None


def test_requeue_queues_each_study_s_last_job_again(storage: Storage) -> None:
    ids = analysed(storage)
    assert storage.jobs.requeue(MODEL, fhir_server=EHR_B) == 2
    assert storage.results.get_result(ref("broken", source=EHR_B), MODEL) is None
    assert storage.results.get_result(ref("pediatric", source=EHR_B), MODEL) is None
    assert storage.results.get_result(ref("lateral"), MODEL) is not None
    film = storage.results.get_result(ref("film"), MODEL)
    assert film is not None and film.result.status == "completed"
    jobs = storage.jobs.claim_batch(MODEL, 10)
    assert sorted(j.id for j in jobs) == sorted([ids["broken"], ids["pediatric"]])
    assert all(j.attempts == 1 for j in jobs)  # counted afresh
    assert storage.jobs.requeue(MODEL, fhir_server=EHR_B) == 0  # no results left to redo
    assert storage.jobs.requeue(MODEL) == 1  # lateral


# -- reads -----------------------------------------------------------------------------------


def test_reads_of_nothing(storage: Storage) -> None:
    jobs = storage.jobs
    assert jobs.analysis(12345) is None
    assert jobs.latest_job_id(ref("1"), MODEL) is None
    assert jobs.job_state(ref("1"), MODEL) is None
    assert jobs.waiting_reason(ref("1"), MODEL) is None
    assert jobs.job_counts(MODEL) == dict.fromkeys(JOB_STATES, 0)
    assert jobs.queue_depth(MODEL) == 0
    assert jobs.release_waiting() == 0
    assert jobs.requeue(MODEL) == 0
    jobs.renew_leases("nobody")


def test_analysis_of_a_queued_and_a_running_job(storage: Storage) -> None:
    before = time.time()
    storage.jobs.enqueue(ref("1", patient="p9"), MODEL, STUDY, EHR_A)
    job_id = storage.jobs.latest_job_id(ref("1"), MODEL)
    assert job_id is not None
    analysis = storage.jobs.analysis(job_id)
    assert analysis is not None
    assert analysis.ref == StudyRef(EHR_A, "1", "p9")
    assert (analysis.model_id, analysis.model_version) == (MODEL.model_id, MODEL.version)
    assert (analysis.job_status, analysis.reason, analysis.result) == ("queued", None, None)
    assert before - 1 <= analysis.created_at <= time.time() + 1
    assert isinstance(analysis.id, int) and analysis.filed_location is None
    claim_one(storage)
    running = storage.jobs.analysis(job_id)
    assert running is not None and running.job_status == "running"
    # A result stored before (another analysis of the study) shows with its job.
    storage.results.put_result(ref("1"), result("1", "not-analysed", "lateral"))
    shown = storage.jobs.analysis(job_id)
    assert shown is not None and shown.result == result("1", "not-analysed", "lateral")


# -- workers ---------------------------------------------------------------------------------


def test_worker_heartbeats_and_exits(storage: Storage) -> None:
    workers = storage.workers
    label = MODEL.label
    assert workers.alive(label, 60) == []
    assert workers.last_exit(label) is None
    workers.heartbeat("host:1", label)
    workers.heartbeat("host:2", label, "the model is unavailable " + "y" * 1000)
    workers.heartbeat("host:3", NEXT_VERSION.label)
    alive = dict(workers.alive(label, 60))
    assert set(alive) == {"host:1", "host:2"}
    assert alive["host:1"] is None
    error = alive["host:2"]
    assert error is not None and len(error) == 500
    workers.heartbeat("host:2", label)  # recovered: the error is gone
    assert dict(workers.alive(label, 60))["host:2"] is None
    workers.record_exit(label, "worker exited with code -9 " + "z" * 1000)
    last = workers.last_exit(label)
    assert last is not None and last.startswith("worker exited with code -9") and len(last) == 500
    assert "exit:" + label not in dict(workers.alive(label, 60))
    workers.record_exit(label, "second death")
    assert workers.last_exit(label) == "second death"
    time.sleep(0.2)
    assert workers.alive(label, 0.1) == []  # not seen lately


# -- results, cards, feedback, replay cache, cursors -----------------------------------------


def test_results_are_kept_per_source_study_and_model_version(storage: Storage) -> None:
    results = storage.results
    full = AnalysisResult(
        "1.2",
        MODEL,
        "completed",
        report_text="Right lower lobe consolidation.",
        findings=(
            Finding(Observation.CONSOLIDATION, "present", "Right lower lobe consolidation.", 0.9),
            Finding(Observation.PNEUMOTHORAX, "absent", "No pneumothorax."),
        ),
        study_started="2026-11-20T10:00:00+00:00",
        analysed_at="2026-11-20T10:01:00+00:00",
        extra={"timings": {"decode_s": 0.25}, "views": ["PA"]},
    )
    results.put_result(ref("1.2", patient="p5"), full)
    stored = results.get_result(ref("1.2"), MODEL)
    assert stored is not None
    assert stored.result == full and stored.patient_id == "p5" and stored.filed_location is None
    assert results.get_result(ref("1.2", source=EHR_B), MODEL) is None
    assert results.get_result(ref("1.2"), NEXT_VERSION) is None
    results.mark_filed(EHR_A, "1.2", MODEL, "DiagnosticReport/3/_history/1")
    filed = results.get_result(ref("1.2"), MODEL)
    assert filed is not None and filed.filed_location == "DiagnosticReport/3/_history/1"
    results.mark_filed(EHR_A, "unknown", MODEL, "DiagnosticReport/4")  # nothing to mark
    # Storing again replaces the whole row (a new analysis is not filed yet).
    results.put_result(ref("1.2", patient="p6"), result("1.2", "not-analysed", "lateral"))
    replaced = results.get_result(ref("1.2"), MODEL)
    assert replaced is not None
    assert replaced.result.status == "not-analysed" and replaced.patient_id == "p6"
    assert replaced.filed_location is None


def test_any_result_json_python_writes_is_kept(storage: Storage) -> None:
    odd = AnalysisResult(
        "1.3",
        MODEL,
        "completed",
        report_text="nul \u0000 byte, é, ✓, \U0001fac1",
        extra={"nan": math.nan, "inf": math.inf},
    )
    storage.results.put_result(ref("1.3"), odd)
    stored = storage.results.get_result(ref("1.3"), MODEL)
    assert stored is not None
    assert stored.result.report_text == odd.report_text
    assert math.isnan(stored.result.extra["nan"]) and stored.result.extra["inf"] == math.inf


def card(uuid: str, finding: str = "Consolidation") -> CardRecord:
    return CardRecord(uuid, EHR_A, "1.2", finding, "present", MODEL.model_id, MODEL.version)


def test_card_log(storage: Storage) -> None:
    cards = storage.cards
    cards.record_cards([])
    cards.record_cards([card("u1"), card("u2", "Edema")])
    cards.record_cards([card("u1", "Pneumothorax")])  # a card uuid keeps what it first said
    assert cards.card_record("u1") == card("u1")
    assert cards.card_record("u2") == card("u2", "Edema")
    assert cards.card_record("u3") is None
    cards.record_cards(card(f"g{n}") for n in range(3))  # any iterable
    assert cards.card_record("g2") == card("g2")


def test_feedback_is_kept_once_and_joined_to_its_card(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL reads feedback in pages: several here.
    monkeypatch.setattr("cds_service.storage.postgres.records.FEEDBACK_PAGE", 2)
    feedback = storage.feedback
    storage.cards.record_cards([card("u1")])
    item = {"card": "u1", "outcome": "overridden", "overrideReasons": [{"code": "fp"}]}
    assert feedback.store_feedback("cxr-patient-view", item)
    assert not feedback.store_feedback("cxr-patient-view", dict(reversed(item.items())))
    assert feedback.store_feedback("cxr-order-select", item)  # another service's item
    for number in range(3):
        assert feedback.store_feedback("cxr-patient-view", {"card": "gone", "outcome": str(number)})
    assert feedback.feedback_count() == 5
    assert feedback.feedback_count("cxr-patient-view") == 4
    assert feedback.feedback_count("nobody") == 0
    rows = list(feedback.feedback_rows())
    assert [(r["service_id"], r["card_uuid"], r["outcome"]) for r in rows] == [
        ("cxr-patient-view", "u1", "overridden"),
        ("cxr-order-select", "u1", "overridden"),
        ("cxr-patient-view", "gone", "0"),
        ("cxr-patient-view", "gone", "1"),
        ("cxr-patient-view", "gone", "2"),
    ]
    first = rows[0]
    assert first["finding"] == "Consolidation" and first["ai_state"] == "present"
    assert (first["source"], first["study_uid"]) == (EHR_A, "1.2")
    assert (first["model_id"], first["model_version"]) == (MODEL.model_id, MODEL.version)
    assert first["body"] == (
        '{"card":"u1","outcome":"overridden","overrideReasons":[{"code":"fp"}]}'
    )
    assert isinstance(first["received_at"], float)
    assert [r["received_at"] for r in rows] == sorted(r["received_at"] for r in rows)
    assert rows[-1]["finding"] is None and rows[-1]["source"] is None  # card never logged


def test_replay_cache(storage: Storage) -> None:
    replay = storage.replay
    exp = int(time.time()) + 300
    assert replay.remember_jti("https://ehr.example", "jti-1", exp)
    assert not replay.remember_jti("https://ehr.example", "jti-1", exp)
    assert not replay.remember_jti("https://ehr.example", "jti-1", exp + 100)
    assert replay.remember_jti("https://other.example", "jti-1", exp)  # per issuer
    assert replay.remember_jti("https://ehr.example", "jti-2", exp)
    # Already expired: still remembered (a replay within the clock skew is still a replay).
    assert replay.remember_jti("https://ehr.example", "jti-3", int(time.time()) - 30)
    assert not replay.remember_jti("https://ehr.example", "jti-3", int(time.time()) - 30)


def test_watch_cursors_move_forward_only(storage: Storage) -> None:
    cursors = storage.cursors
    assert cursors.watch_cursor(EHR_A) is None
    cursors.set_watch_cursor(EHR_A, "2026-11-20T10:00:00Z")
    cursors.set_watch_cursor(EHR_A, "2026-11-19T23:59:59Z")  # a slow poll finishing late
    assert cursors.watch_cursor(EHR_A) == "2026-11-20T10:00:00Z"
    cursors.set_watch_cursor(EHR_A, "2026-11-20T10:00:01Z")
    assert cursors.watch_cursor(EHR_A) == "2026-11-20T10:00:01Z"
    cursors.set_watch_cursor(EHR_B, "2025-01-01T00:00:00Z")  # per source
    assert cursors.watch_cursor(EHR_B) == "2025-01-01T00:00:00Z"
    assert cursors.watch_cursor(EHR_A) == "2026-11-20T10:00:01Z"
