"""A batching engine that owns the model's device.

Requests queue up and one worker thread serves them in dynamic batches (whatever is queued,
up to the batch limit); deadlines and cancellations are checked for each chunk just before it
runs, and only that chunk is marked running. A watchdog fails every waiting request and marks
the engine unhealthy while one batch runs past `hang_s`: the hung chunk fails with EngineError,
everything queued behind it and every new request with ModelUnavailable (not the request's
fault: a job worker puts those back without counting an attempt). A device
out-of-memory error halves the batch limit and retries the same requests: a request is never
lost or answered twice. A request waits at most its timeout; one that times out before it runs
is never run. Metrics: queue depth, batch sizes, tokens/s, peak memory, OOM retries, timeouts,
hung batches, health.
"""

from __future__ import annotations

import logging
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cds_service.errors import CdsServiceError
from cds_service.inference.base import ModelUnavailable

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")
GROW_BACK_AFTER = 8  # successful batches before a shrunk batch limit doubles again


class EngineError(CdsServiceError):
    """The engine could not produce a result for a request (the message says why)."""


class RequestTimeout(EngineError):
    """A request was not answered within its timeout."""


@dataclass(frozen=True)
class BatchResult(Generic[Out]):
    outputs: list[Out]
    new_tokens: int = 0


@dataclass
class EngineMetrics:
    queue_depth: int = 0
    batch_limit: int = 0
    batches: int = 0
    last_batch_size: int = 0
    largest_batch: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    oom_retries: int = 0
    new_tokens: int = 0
    busy_s: float = 0.0
    peak_memory_bytes: int = 0
    hung_batches: int = 0
    healthy: bool = True

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.busy_s if self.busy_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        values: dict[str, float | int] = dict(vars(self))
        values["tokens_per_s"] = round(self.tokens_per_s, 2)
        return values


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    deadline: float
    future: Future[Out] = field(default_factory=Future)
    started: bool = False  # marked running (only once it is in the chunk about to run)


def _settle(
    future: Future[Out], result: Out | None = None, error: BaseException | None = None
) -> bool:
    """Finish a future unless it already is (cancelled by its caller, failed by the watchdog)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # Out when error is None
    except InvalidStateError:
        return False
    return True


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or a RuntimeError saying so (other allocators)."""
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def process_peak_memory() -> int:
    """Peak resident memory of this process in bytes (Linux reports kB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class BatchEngine(Generic[In, Out]):
    """Thread-safe: any thread may submit; one worker thread runs the batches; a watchdog
    thread fails everything waiting when one batch runs longer than `hang_s`."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], BatchResult[Out]],
        *,
        max_batch_size: int = 8,
        timeout_s: float = 600.0,
        hang_s: float | None = None,
        gather_s: float = 0.002,
        peak_memory: Callable[[], int] = process_peak_memory,
        release_memory: Callable[[], None] | None = None,
        name: str = "inference",
    ) -> None:
        if max_batch_size < 1 or timeout_s <= 0 or (hang_s is not None and hang_s <= 0):
            raise ValueError("max_batch_size must be >= 1, timeout_s and hang_s > 0")
        self._run_batch = run_batch
        self._max_batch = max_batch_size
        self._limit = max_batch_size
        self._timeout_s = timeout_s
        # A batch running longer than any request may wait is hung: by then all its callers
        # have given up, and everything queued behind it would wait forever.
        self._hang_s = hang_s or timeout_s
        self._gather_s = gather_s
        self._peak_memory = peak_memory
        self._release_memory = release_memory
        self._queue: queue.Queue[_Pending[In, Out]] = queue.Queue()
        self._lock = threading.Lock()  # metrics
        # backlog, running chunk, health, and the stop flag with every queue put: a request is
        # queued only while the engine is running and healthy, so whoever stops the engine or
        # declares it hung (and then drains the queue) also fails that request.
        self._work = threading.Lock()
        self._backlog: list[_Pending[In, Out]] = []  # taken from the queue, not yet run
        self._running: list[_Pending[In, Out]] = []
        self._running_since: float | None = None
        self._healthy = True
        self._metrics = EngineMetrics(batch_limit=max_batch_size)
        self._stop = threading.Event()
        self._successes_since_oom = 0
        self._thread = threading.Thread(target=self._serve, name=f"{name}-engine", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)

    # -- public API ------------------------------------------------------------------------
    def start(self, warmup: Sequence[In] = ()) -> BatchEngine[In, Out]:
        """Run the warm-up requests (compiles kernels, sizes the allocator), then serve."""
        if warmup:
            started = time.monotonic()
            self._run_batch(list(warmup))
            log.info(
                "engine warm-up: %d request(s) in %.2f s", len(warmup), time.monotonic() - started
            )
        self._thread.start()
        self._watchdog.start()
        return self

    @property
    def healthy(self) -> bool:
        """False while a batch has run past `hang_s` (the model stopped responding)."""
        with self._work:
            return self._healthy

    def submit(self, item: In, timeout_s: float | None = None) -> Future[Out]:
        """Queue one request. Raises ModelUnavailable while stopped or unhealthy."""
        pending: _Pending[In, Out] = _Pending(
            item, time.monotonic() + (timeout_s or self._timeout_s)
        )
        with self._work:
            if self._stop.is_set():
                raise ModelUnavailable("the inference engine is stopped")
            if not self._healthy:
                raise ModelUnavailable(
                    "the inference engine is unhealthy: the model stopped responding"
                )
            self._queue.put(pending)
        return pending.future

    def run(self, items: Sequence[In], timeout_s: float | None = None) -> list[Out]:
        """Submit all, wait for all (in order). Raises RequestTimeout, ModelUnavailable or
        EngineError."""
        limit = timeout_s or self._timeout_s
        futures: list[Future[Out]] = []
        try:
            for item in items:
                futures.append(self.submit(item, limit))
        except ModelUnavailable:
            for submitted in futures:
                submitted.cancel()  # no half-run set: the caller retries all of them later
            raise
        deadline = time.monotonic() + limit
        results: list[Out] = []
        for future in futures:
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout as exc:
                for other in futures:
                    other.cancel()  # the ones not yet running never run
                self._count("timed_out")
                raise RequestTimeout(f"no result within {limit:.0f} s") from exc
        return results

    def metrics(self) -> EngineMetrics:
        with self._lock:
            snapshot = EngineMetrics(**vars(self._metrics))
        snapshot.queue_depth = self._queue.qsize()
        snapshot.healthy = self.healthy
        return snapshot

    def stop(self, wait_s: float = 5.0) -> None:
        with self._work:
            self._stop.set()
        for thread in (self._thread, self._watchdog):
            if thread.is_alive():
                thread.join(wait_s)
        with self._work:
            left = self._running + self._backlog + self._drain_queue()  # running: if stuck
            self._backlog = []
        for pending in left:
            _settle(pending.future, error=ModelUnavailable("the inference engine stopped"))

    # -- worker ----------------------------------------------------------------------------
    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self._metrics, name, getattr(self._metrics, name) + amount)

    def _drain_queue(self) -> list[_Pending[In, Out]]:
        drained = []
        while True:
            try:
                drained.append(self._queue.get_nowait())
            except queue.Empty:
                return drained

    def _take_batch(self) -> list[_Pending[In, Out]]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        gather_until = time.monotonic() + self._gather_s
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                if time.monotonic() >= gather_until:
                    break
                time.sleep(self._gather_s / 4)
        return batch

    def _next_chunk(self) -> list[_Pending[In, Out]]:
        """Up to the batch limit from the backlog, checked now: cancelled and finished ones
        are dropped, expired ones time out; only the chosen ones are marked running."""
        now = time.monotonic()
        chunk: list[_Pending[In, Out]] = []
        timed_out = 0
        with self._work:
            while self._backlog and len(chunk) < self._limit:
                pending = self._backlog.pop(0)
                if pending.future.done():
                    continue
                if not pending.started:
                    if not pending.future.set_running_or_notify_cancel():
                        continue
                    pending.started = True
                if now > pending.deadline:
                    timed_out += _settle(pending.future, error=RequestTimeout("timed out queued"))
                    continue
                chunk.append(pending)
            self._running = chunk
            self._running_since = now if chunk else None
        if timed_out:
            self._count("timed_out", timed_out)
        return chunk

    def _serve(self) -> None:
        while not self._stop.is_set():
            taken = self._take_batch()
            with self._work:
                self._backlog.extend(taken)
            while not self._stop.is_set():
                chunk = self._next_chunk()
                if not chunk:
                    break
                self._run_chunk(chunk)

    def _finish_running(self) -> None:
        with self._work:
            self._running = []
            self._running_since = None
            if not self._healthy:
                self._healthy = True
                log.warning("the model answered again after a hang; serving again")

    def _run_chunk(self, chunk: list[_Pending[In, Out]]) -> None:
        started = time.monotonic()
        try:
            result = self._run_batch([p.item for p in chunk])
            if len(result.outputs) != len(chunk):
                raise EngineError("the model returned a wrong number of results")
        except Exception as exc:  # noqa: BLE001 - every failure is handed to its callers
            self._finish_running()
            if is_out_of_memory(exc):
                self._after_oom(chunk)
                return
            log.error("inference batch of %d failed: %s", len(chunk), type(exc).__name__)
            failure = (
                exc
                if isinstance(exc, CdsServiceError)
                else EngineError(f"inference failed: {type(exc).__name__}")
            )
            failed = sum(_settle(p.future, error=failure) for p in chunk)
            self._count("failed", failed)
            return
        self._finish_running()
        completed = sum(
            _settle(p.future, output) for p, output in zip(chunk, result.outputs, strict=True)
        )
        with self._lock:
            m = self._metrics
            m.batches += 1
            m.last_batch_size = len(chunk)
            m.largest_batch = max(m.largest_batch, len(chunk))
            m.completed += completed
            m.new_tokens += result.new_tokens
            m.busy_s += time.monotonic() - started
            m.peak_memory_bytes = max(m.peak_memory_bytes, self._peak_memory())
        self._grow_back()

    def _after_oom(self, chunk: list[_Pending[In, Out]]) -> None:
        if self._release_memory is not None:
            self._release_memory()
        self._count("oom_retries")
        self._successes_since_oom = 0
        if self._limit == 1:
            log.error("out of device memory with a batch of one; that request fails")
            error = EngineError("out of device memory for one request")
            self._count("failed", sum(_settle(p.future, error=error) for p in chunk))
            return
        self._limit = max(1, min(self._limit, len(chunk)) // 2)
        with self._lock:
            self._metrics.batch_limit = self._limit
        log.warning("out of device memory: batch limit now %d, retrying", self._limit)
        with self._work:
            self._backlog[:0] = chunk  # first in line again, deadlines checked again

    def _grow_back(self) -> None:
        if self._limit >= self._max_batch:
            return
        self._successes_since_oom += 1
        if self._successes_since_oom >= GROW_BACK_AFTER:
            self._limit = min(self._max_batch, self._limit * 2)
            self._successes_since_oom = 0
            with self._lock:
                self._metrics.batch_limit = self._limit

    # -- watchdog --------------------------------------------------------------------------
    def _watch(self) -> None:
        interval = min(1.0, self._hang_s / 4)
        while not self._stop.wait(interval):
            with self._work:
                since = self._running_since
                if not self._healthy or since is None or time.monotonic() - since < self._hang_s:
                    continue
                self._healthy = False
                hung = list(self._running)
                waiting = self._backlog + self._drain_queue()
                self._backlog = []
            log.error(
                "a batch has run over %.0f s: the model stopped responding; failing %d "
                "request(s) and refusing new ones until it answers",
                self._hang_s,
                len(hung) + len(waiting),
            )
            why = f"the model stopped responding (a batch ran over {self._hang_s:.0f} s)"
            self._count("hung_batches")
            failed = sum(_settle(p.future, error=EngineError(why)) for p in hung)
            failed += sum(_settle(p.future, error=ModelUnavailable(why)) for p in waiting)
            self._count("failed", failed)
