"""What the service keeps, as narrow interfaces (ports), and the values that cross them.

Each consumer depends on the port it uses, never on a database: the hook handler reads the
result store and writes the card log, the worker drives the job queue, the JWT verifier asks
the replay cache. Adapters (`cds_service.storage.sqlite`, `cds_service.storage.postgres`)
implement them, and `cds_service.composition` picks the adapter from the settings.

Exactly-once is a property of the adapters' unique keys, not of their callers: enqueueing a
study that has a live job is a no-op, and a result is stored and its job closed together.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from cds_service.config import JOB_LEASE_S
from cds_service.imaging.limits import DEFAULT_MAX_BYTES
from cds_service.results import AnalysisResult, CardRecord, ModelInfo
from cds_service.sources import canonical_fhir_base

JOB_STATES = ("queued", "waiting", "running", "done", "failed")  # JobQueue.job_counts() keys


@dataclass(frozen=True)
class StudyRef:
    """A study in its data source: the canonical FHIR base of the EHR that holds it (or, for a
    caller that named no FHIR server, the caller's issuer)."""

    source: str
    study_uid: str
    patient_id: str | None = None

    def __post_init__(self) -> None:
        # One spelling per FHIR base, whoever built the reference.
        object.__setattr__(self, "source", canonical_fhir_base(self.source))


@dataclass(frozen=True)
class StoredResult:
    result: AnalysisResult
    patient_id: str | None
    filed_location: str | None = None  # where the EHR keeps the filed DiagnosticReport


@dataclass(frozen=True)
class Job:
    id: int
    ref: StudyRef
    model: ModelInfo
    fhir_server: str | None
    study_resource: dict[str, Any]
    attempts: int
    created_at: float = 0.0  # when the job was queued (time.time()); 0: not known
    dicom: bytes | None = None  # the image the job came with (analysed instead of fetched)


@dataclass(frozen=True)
class Analysis:
    """A job and, once there is one, its result (what the REST API reports)."""

    id: int
    ref: StudyRef
    model_id: str
    model_version: str
    job_status: str  # queued, waiting, running, done, failed
    reason: str | None
    created_at: float
    result: AnalysisResult | None
    filed_location: str | None


class QueueFull(Exception):
    """The analysis queue is at its limit; the caller gets 'in progress' later, not a crash."""


class ImageTooLarge(ValueError):
    """The image a job was to carry exceeds the image limit; nothing was queued."""


class JobQueue(Protocol):
    """Analyses to run, one live job per study and model version, claimed as leases."""

    def enqueue(
        self,
        ref: StudyRef,
        model: ModelInfo,
        study_resource: dict[str, Any],
        fhir_server: str | None,
        dicom: bytes | None = None,
        *,
        max_dicom_bytes: int = DEFAULT_MAX_BYTES,
    ) -> bool:
        """Queue an analysis; False when one is already live for this study and model.

        ``dicom``: the study's image (the viewer read it with the clinician's token), kept with
        the job and analysed instead of fetching; a live job without an image gets this one
        and waits no longer. QueueFull at the queue limit; ImageTooLarge over
        ``max_dicom_bytes``."""
        ...

    def job_state(self, ref: StudyRef, model: ModelInfo) -> str | None:
        """'queued' or 'running' when a live job exists, else None."""
        ...

    def waiting_reason(self, ref: StudyRef, model: ModelInfo) -> str | None:
        """Why the study's queued job waits (None when it is not waiting)."""
        ...

    def claim_batch(
        self,
        model: ModelInfo,
        limit: int,
        stale_after_s: float = JOB_LEASE_S,
        owner: str | None = None,
    ) -> list[Job]:
        """Take up to ``limit`` of the oldest claimable jobs for this model at once. A claim
        is a lease held by ``owner`` while it renews it; a running job left unrenewed past
        ``stale_after_s`` goes to the next claim (its worker died)."""
        ...

    def claim(self, model: ModelInfo, stale_after_s: float = JOB_LEASE_S) -> Job | None:
        """Take the oldest claimable job, if any (a batch of one)."""
        ...

    def renew_leases(self, owner: str) -> None:
        """Keep every job ``owner`` is running claimed by it."""
        ...

    def finish(self, job: Job, result: AnalysisResult, filed_location: str | None = None) -> None:
        """Store the result (and where the EHR filed its report) and close the job together:
        no lost and no double result."""
        ...

    def fail(
        self, job: Job, error: str, final: AnalysisResult | None = None, retry_in_s: float = 0.0
    ) -> None:
        """Queue the job again, not claimable for ``retry_in_s``; or, with ``final``, store
        that result and close the job, together."""
        ...

    def put_back(self, job: Job, reason: str) -> None:
        """Queue again, uncounted, a job that could not start through no fault of its study
        (the model was unavailable)."""
        ...

    def defer(self, job: Job, reason: str, delay_s: float) -> None:
        """Queue again, uncounted and not claimable for ``delay_s``, a job that cannot run yet
        (no access to its EHR); ``reason`` says why."""
        ...

    def release_waiting(self) -> int:
        """Make every waiting job claimable now; how many there were."""
        ...

    def requeue(
        self,
        model: ModelInfo,
        *,
        study_uid: str | None = None,
        statuses: Iterable[str] = ("not-analysed", "failed"),
        reason: str | None = None,
        fhir_server: str | None = None,
        dry_run: bool = False,
    ) -> int:
        """Analyse again the studies whose result has one of ``statuses`` (never "completed":
        that would file a second report), optionally one study, a reason containing
        ``reason``, or one FHIR base; how many (would be, with ``dry_run``)."""
        ...

    def analysis(self, job_id: int) -> Analysis | None:
        """One job, with its study's result for that model once there is one."""
        ...

    def latest_job_id(self, ref: StudyRef, model: ModelInfo) -> int | None:
        """The id of the study's latest job for this model (live or not)."""
        ...

    def queue_depth(self, model: ModelInfo) -> int:
        """Live (queued or running) jobs of this model version."""
        ...

    def job_counts(self, model: ModelInfo) -> dict[str, int]:
        """Jobs of this model version in each of JOB_STATES (every key present)."""
        ...


class WorkerRegistry(Protocol):
    """The inference workers' signs of life and last words, for /readyz."""

    def heartbeat(self, name: str, model_label: str, error: str | None = None) -> None:
        """Worker ``name`` is alive with its model loaded (``error``: why it cannot work)."""
        ...

    def alive(self, model_label: str, seen_within_s: float) -> list[tuple[str, str | None]]:
        """(name, last error) of this model's workers seen within ``seen_within_s``."""
        ...

    def record_exit(self, model_label: str, message: str) -> None:
        """The supervisor saw this model's worker die, saying ``message``."""
        ...

    def last_exit(self, model_label: str) -> str | None:
        """What this model's last dead worker said, if one died."""
        ...


class ResultStore(Protocol):
    """One analysis result per study, data source, model id and version."""

    def put_result(self, ref: StudyRef, result: AnalysisResult) -> None: ...

    def get_result(self, ref: StudyRef, model: ModelInfo) -> StoredResult | None: ...

    def mark_filed(self, source: str, study_uid: str, model: ModelInfo, location: str) -> None:
        """The report of this analysis is in the EHR at ``location`` (no more filing offers)."""
        ...


class CardLog(Protocol):
    """What each AI-result card said, so feedback on a card can be traced to its finding."""

    def record_cards(self, records: Iterable[CardRecord]) -> None: ...

    def card_record(self, card_uuid: str) -> CardRecord | None: ...


class FeedbackLog(Protocol):
    """Clinicians' feedback on cards, each distinct item kept once."""

    def store_feedback(self, service_id: str, item: dict[str, Any]) -> bool:
        """Keep one item; False when the identical item was kept before."""
        ...

    def feedback_rows(self) -> Iterator[dict[str, Any]]:
        """Every item, oldest first, with the finding and model its card stated."""
        ...

    def feedback_count(self, service_id: str | None = None) -> int: ...


class ReplayCache(Protocol):
    """Token ids (JWT ``jti``) seen before their expiry: a second use is a replay."""

    def remember_jti(self, iss: str, jti: str, expires_at: int) -> bool:
        """Record a token id; False when it was seen before."""
        ...


class ArrivalCursors(Protocol):
    """How far the polling watcher (and empty Subscription notifications) got, per source."""

    def watch_cursor(self, source: str) -> str | None:
        """The meta.lastUpdated reached for this data source (None: never polled)."""
        ...

    def set_watch_cursor(self, source: str, last_updated: str) -> None:
        """Move the cursor forward, never back (a slow poll never undoes a faster one)."""
        ...


@dataclass(frozen=True)
class Storage:
    """Every port, as one adapter set built them (they may share one database)."""

    jobs: JobQueue
    workers: WorkerRegistry
    results: ResultStore
    cards: CardLog
    feedback: FeedbackLog
    replay: ReplayCache
    cursors: ArrivalCursors
    # What the adapters raise when their database does not answer (/readyz reports it).
    errors: tuple[type[Exception], ...] = ()
