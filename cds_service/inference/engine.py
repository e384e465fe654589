"""A batching engine that owns the model's device.

Requests queue up and one worker thread serves them in dynamic batches (whatever is queued,
up to the batch limit). A device out-of-memory error halves the batch limit and retries the
same requests: a request is never lost or answered twice. A request waits at most its timeout;
one that times out before it runs is never run. Metrics: queue depth, batch sizes, tokens/s,
peak memory, OOM retries, timeouts.
"""

from __future__ import annotations

import logging
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cds_service.errors import CdsServiceError

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
    """Thread-safe: any thread may submit; one worker thread runs the batches."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], BatchResult[Out]],
        *,
        max_batch_size: int = 8,
        timeout_s: float = 600.0,
        gather_s: float = 0.002,
        peak_memory: Callable[[], int] = process_peak_memory,
        release_memory: Callable[[], None] | None = None,
        name: str = "inference",
    ) -> None:
        if max_batch_size < 1 or timeout_s <= 0:
            raise ValueError("max_batch_size must be >= 1 and timeout_s > 0")
        self._run_batch = run_batch
        self._max_batch = max_batch_size
        self._limit = max_batch_size
        self._timeout_s = timeout_s
        self._gather_s = gather_s
        self._peak_memory = peak_memory
        self._release_memory = release_memory
        self._queue: queue.Queue[_Pending[In, Out]] = queue.Queue()
        self._lock = threading.Lock()
        self._metrics = EngineMetrics(batch_limit=max_batch_size)
        self._stop = threading.Event()
        self._successes_since_oom = 0
        self._thread = threading.Thread(target=self._serve, name=f"{name}-engine", daemon=True)

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
        return self

    def submit(self, item: In, timeout_s: float | None = None) -> Future[Out]:
        if self._stop.is_set():
            raise EngineError("the inference engine is stopped")
        pending: _Pending[In, Out] = _Pending(
            item, time.monotonic() + (timeout_s or self._timeout_s)
        )
        self._queue.put(pending)
        return pending.future

    def run(self, items: Sequence[In], timeout_s: float | None = None) -> list[Out]:
        """Submit all, wait for all (in order). Raises RequestTimeout or EngineError."""
        limit = timeout_s or self._timeout_s
        futures = [self.submit(item, limit) for item in items]
        deadline = time.monotonic() + limit
        results: list[Out] = []
        for future in futures:
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout as exc:
                for other in futures:
                    other.cancel()
                self._count("timed_out")
                raise RequestTimeout(f"no result within {limit:.0f} s") from exc
        return results

    def metrics(self) -> EngineMetrics:
        with self._lock:
            snapshot = EngineMetrics(**vars(self._metrics))
        snapshot.queue_depth = self._queue.qsize()
        return snapshot

    def stop(self, wait_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(wait_s)
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(EngineError("the inference engine stopped"))

    # -- worker ----------------------------------------------------------------------------
    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self._metrics, name, getattr(self._metrics, name) + amount)

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

    def _runnable(self, batch: list[_Pending[In, Out]]) -> list[_Pending[In, Out]]:
        """Drop cancelled requests; time out the ones whose deadline has passed."""
        now = time.monotonic()
        kept = []
        for pending in batch:
            if not pending.future.set_running_or_notify_cancel():
                continue
            if now > pending.deadline:
                pending.future.set_exception(RequestTimeout("timed out while queued"))
                self._count("timed_out")
                continue
            kept.append(pending)
        return kept

    def _serve(self) -> None:
        while not self._stop.is_set():
            batch = self._runnable(self._take_batch())
            while batch:
                batch = self._run_some(batch)

    def _run_some(self, pending: list[_Pending[In, Out]]) -> list[_Pending[In, Out]]:
        """Run up to the batch limit; return what is still to run."""
        chunk = pending[: self._limit]
        started = time.monotonic()
        try:
            result = self._run_batch([p.item for p in chunk])
            if len(result.outputs) != len(chunk):
                raise EngineError("the model returned a wrong number of results")
        except Exception as exc:  # noqa: BLE001 - every failure is handed to its callers
            if is_out_of_memory(exc):
                return self._after_oom(pending, exc)
            log.error("inference batch of %d failed: %s", len(chunk), type(exc).__name__)
            failure = (
                exc
                if isinstance(exc, CdsServiceError)
                else EngineError(f"inference failed: {type(exc).__name__}")
            )
            for p in chunk:
                p.future.set_exception(failure)
            self._count("failed", len(chunk))
            return pending[len(chunk) :]
        for p, output in zip(chunk, result.outputs, strict=True):
            p.future.set_result(output)
        with self._lock:
            m = self._metrics
            m.batches += 1
            m.last_batch_size = len(chunk)
            m.largest_batch = max(m.largest_batch, len(chunk))
            m.completed += len(chunk)
            m.new_tokens += result.new_tokens
            m.busy_s += time.monotonic() - started
            m.peak_memory_bytes = max(m.peak_memory_bytes, self._peak_memory())
        self._grow_back()
        return pending[len(chunk) :]

    def _after_oom(
        self, pending: list[_Pending[In, Out]], exc: BaseException
    ) -> list[_Pending[In, Out]]:
        if self._release_memory is not None:
            self._release_memory()
        self._count("oom_retries")
        self._successes_since_oom = 0
        if self._limit == 1:
            log.error("out of memory with a batch of one; that request fails")
            pending[0].future.set_exception(EngineError("out of device memory for one request"))
            self._count("failed")
            return pending[1:]
        self._limit = max(1, min(self._limit, len(pending)) // 2)
        with self._lock:
            self._metrics.batch_limit = self._limit
        log.warning("out of device memory: batch limit now %d, retrying", self._limit)
        return pending

    def _grow_back(self) -> None:
        if self._limit >= self._max_batch:
            return
        self._successes_since_oom += 1
        if self._successes_since_oom >= GROW_BACK_AFTER:
            self._limit = min(self._max_batch, self._limit * 2)
            self._successes_since_oom = 0
            with self._lock:
                self._metrics.batch_limit = self._limit
