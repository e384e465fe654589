"""The service's Prometheus metrics, defined once, and their text exposition (GET /metrics).

Counters and histograms are recorded by the process doing the work: the web tier (hook
latency, error responses), the inference worker (batches, job latency, outcomes) and the
model pipeline (generated tokens). `cxr-cds serve` runs these in separate processes, so it
sets PROMETHEUS_MULTIPROC_DIR first (cds_service.observability.multiproc): each process then
keeps its values in files there and `render` adds them all up. Without it (tests, `cxr-cds
demo`, whose worker is a thread) the values stay in this process's REGISTRY.

The job counts by state are read from the job queue at scrape time (`QueueCollector`), so
they are right whichever process queued or ran the jobs.

No label carries PHI: only service ids, outcome kinds, HTTP status codes and Flask endpoint
names; never a study UID, patient id or URL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from cds_service.observability.multiproc import multiprocess_dir
from cds_service.results import ModelInfo

if TYPE_CHECKING:
    from cds_service.storage.ports import JobQueue

# This process's metrics (when no multiprocess directory is set). Not prometheus_client's
# global REGISTRY: nothing else registers here, and every name below is ours.
REGISTRY = CollectorRegistry()

# Jobs wait for a worker and the model: seconds to an hour.
JOB_LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # CXR_CDS_MODEL_BATCH_SIZE is 1..256
# A hook answers from stored results (milliseconds) or waits up to CXR_CDS_HOOK_WAIT_MS.
HOOK_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

JOB_LATENCY = Histogram(
    "cxr_cds_job_latency_seconds",
    "Seconds from a job's arrival (queued) to its result stored, by result status",
    ["status"],
    buckets=JOB_LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "cxr_cds_batch_size",
    "Jobs per batch the worker handed to the model",
    buckets=BATCH_SIZE_BUCKETS,
    registry=REGISTRY,
)
JOB_OUTCOMES = Counter(
    "cxr_cds_job_outcomes",
    "Ends of job attempts: completed, not-analysed, failed (final), retried (an attempt "
    "failed, queued again), waiting-for-access (no access to its EHR), put-back (the model "
    "was unavailable)",
    ["outcome"],
    registry=REGISTRY,
)
MODEL_SECONDS = Counter(
    "cxr_cds_model_seconds",
    "Seconds the model spent writing reports (tokens/s: rate of generated tokens over this)",
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "cxr_cds_generated_tokens",
    "Tokens the model generated (backends that report token counts only)",
    registry=REGISTRY,
)
GENERATED_REPORTS = Counter(
    "cxr_cds_generated_reports",
    "Report texts the model wrote",
    registry=REGISTRY,
)
HOOK_LATENCY = Histogram(
    "cxr_cds_hook_duration_seconds",
    "Seconds to answer a CDS Hooks service call (any status), by service id",
    ["service"],
    buckets=HOOK_LATENCY_BUCKETS,
    registry=REGISTRY,
)
HTTP_ERRORS = Counter(
    "cxr_cds_http_errors",
    "Responses with a 4xx or 5xx status, by Flask endpoint (no URL) and status code",
    ["endpoint", "code"],
    registry=REGISTRY,
)

# JOB_OUTCOMES values.
COMPLETED = "completed"
NOT_ANALYSED = "not-analysed"
FAILED = "failed"
RETRIED = "retried"
WAITING_FOR_ACCESS = "waiting-for-access"
PUT_BACK = "put-back"


def record_batch(size: int) -> None:
    """A batch of ``size`` claimed jobs went to the model."""
    BATCH_SIZE.observe(size)


def record_result(status: str, created_at: float) -> None:
    """A job's result (completed, not-analysed or failed) is stored; ``created_at`` is when
    the job was queued (time.time(); 0 when not known: no latency then)."""
    JOB_OUTCOMES.labels(status).inc()
    if created_at > 0:
        JOB_LATENCY.labels(status).observe(max(0.0, time.time() - created_at))


def record_outcome(outcome: str) -> None:
    """A job attempt ended without a result: RETRIED, WAITING_FOR_ACCESS or PUT_BACK."""
    JOB_OUTCOMES.labels(outcome).inc()


def record_generation(seconds: float, reports: int, tokens: int) -> None:
    """The model wrote ``reports`` texts, ``tokens`` tokens in all (0 when the backend does
    not count them), in ``seconds``."""
    MODEL_SECONDS.inc(max(0.0, seconds))
    GENERATED_REPORTS.inc(reports)
    if tokens > 0:
        GENERATED_TOKENS.inc(tokens)


def record_hook(service_id: str, seconds: float) -> None:
    """Only for service ids the service offers: a caller cannot invent label values."""
    HOOK_LATENCY.labels(service_id).observe(max(0.0, seconds))


def record_http_error(endpoint: str, status: int) -> None:
    HTTP_ERRORS.labels(endpoint, str(status)).inc()


class QueueCollector:
    """Jobs of one model version by state (queued, waiting, running, done, failed), read from
    the store at each scrape, with whether the store answered."""

    def __init__(
        self, queue: JobQueue, model: ModelInfo, errors: tuple[type[Exception], ...]
    ) -> None:
        self._queue = queue
        self._model = model
        self._errors = errors  # what the queue raises when its database does not answer

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cxr_cds_job_store_up", "1 when the job store answered the scrape")
        try:
            counts = self._queue.job_counts(self._model)
        except self._errors:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(
            "cxr_cds_jobs",
            "Jobs of the served model version by state: queued (claimable now), waiting (for "
            "access to their EHR), running, done, failed",
            labels=["state"],
        )
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
        info = GaugeMetricFamily(
            "cxr_cds_model_info",
            "The model this service serves (always 1)",
            labels=["model_id", "version", "simulated"],
        )
        info.add_metric(
            [self._model.model_id, self._model.version, str(self._model.simulated).lower()], 1
        )
        yield info


def render(collectors: Iterable[Collector] = ()) -> bytes:
    """The text exposition of every process's metrics (the multiprocess directory when one is
    set, else this process's) and of ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess_dir()
    if directory is not None:
        MultiProcessCollector(registry, path=directory)
    else:
        registry.register(REGISTRY)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)
