"""The batching engine: batches, OOM shrink-and-retry, timeouts, failures, metrics."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from typing import Any

import pytest
import torch

from cds_service.inference.base import ModelUnavailable
from cds_service.inference.engine import BatchEngine, BatchResult, EngineError, RequestTimeout


class FakeOom(RuntimeError):
    """What torch raises: a RuntimeError subclass named OutOfMemoryError."""


FakeOom.__name__ = "OutOfMemoryError"


class Model:
    """Squares numbers; records every batch it ran; can OOM above a batch size."""

    def __init__(self, oom_above: int | None = None, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.oom_above = oom_above
        self.delay_s = delay_s
        self.released = 0

    def __call__(self, items: list[int]) -> BatchResult[int]:
        if self.oom_above is not None and len(items) > self.oom_above:
            raise FakeOom("CUDA out of memory. Tried to allocate 2.00 GiB")
        time.sleep(self.delay_s)
        self.batches.append(list(items))
        return BatchResult([i * i for i in items], new_tokens=3 * len(items))

    def release(self) -> None:
        self.released += 1


def test_queued_requests_are_served_in_batches_in_order() -> None:
    model = Model(delay_s=0.05)
    engine = BatchEngine(model, max_batch_size=4).start()
    try:
        first = engine.submit(1)  # occupies the worker while the rest queue up
        time.sleep(0.01)
        assert engine.run(list(range(2, 12))) == [i * i for i in range(2, 12)]
        assert first.result(1) == 1
    finally:
        engine.stop()
    assert max(len(b) for b in model.batches) == 4
    assert sorted(i for b in model.batches for i in b) == list(range(1, 12))
    metrics = engine.metrics()
    assert metrics.completed == 11 and metrics.largest_batch == 4
    assert metrics.new_tokens == 33 and metrics.tokens_per_s > 0
    assert metrics.peak_memory_bytes > 0 and metrics.queue_depth == 0


def test_out_of_memory_shrinks_the_batch_and_loses_nothing() -> None:
    model = Model(oom_above=2)
    engine = BatchEngine(model, max_batch_size=8, release_memory=model.release)
    futures = [engine.submit(i) for i in range(8)]  # all queued before the worker starts
    engine.start()
    try:
        assert [f.result(5) for f in futures] == [i * i for i in range(8)]
    finally:
        engine.stop()
    served = Counter(i for b in model.batches for i in b)
    assert served == Counter(range(8))  # each exactly once: none lost, none twice
    assert all(len(b) <= 2 for b in model.batches)
    metrics = engine.metrics()
    assert metrics.oom_retries == 2 and metrics.batch_limit == 2 and model.released == 2


def test_out_of_memory_alone_fails_that_request_only() -> None:
    model = Model(oom_above=0)
    engine = BatchEngine(model, max_batch_size=2).start()
    try:
        with pytest.raises(EngineError, match="out of device memory"):
            engine.run([5])
    finally:
        engine.stop()
    assert engine.metrics().failed == 1


def test_a_stuck_request_times_out_and_the_engine_recovers() -> None:
    release = threading.Event()
    ran: list[int] = []

    def run(items: list[int]) -> BatchResult[int]:
        ran.extend(items)
        if 99 in items:
            release.wait(5)
        return BatchResult(items)

    engine = BatchEngine(run, max_batch_size=1).start()
    try:
        with pytest.raises(RequestTimeout):
            engine.run([99], timeout_s=0.2)
        queued = engine.submit(7, timeout_s=0.1)  # waits behind the stuck one, then expires
        time.sleep(0.2)
        release.set()
        with pytest.raises(RequestTimeout):
            queued.result(2)
        assert engine.run([8], timeout_s=2) == [8]
    finally:
        engine.stop()
    assert ran == [99, 8]  # the expired request never ran; nothing ran twice
    assert engine.metrics().timed_out == 2


class Gate:
    """A model whose batches wait at a gate; records what ran."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.ran: list[int] = []

    def __call__(self, items: list[int]) -> BatchResult[int]:
        self.ran.extend(items)
        self.entered.set()
        self.open.wait(30)
        return BatchResult(items)


def test_only_the_chunk_about_to_run_is_running_and_the_rest_can_still_be_cancelled() -> None:
    gate = Gate()
    engine = BatchEngine(gate, max_batch_size=2)
    futures = [engine.submit(i) for i in range(6)]  # gathered together, run two at a time
    engine.start()
    try:
        assert gate.entered.wait(5)
        assert [f.running() for f in futures] == [True, True, False, False, False, False]
        assert futures[3].cancel() and futures[5].cancel()
        gate.open.set()
        assert [futures[i].result(5) for i in (0, 1, 2, 4)] == [0, 1, 2, 4]
    finally:
        gate.open.set()
        engine.stop()
    assert gate.ran == [0, 1, 2, 4]  # cancelled requests never ran


def test_deadlines_are_checked_for_each_chunk_not_only_when_gathered() -> None:
    gate = Gate()
    engine = BatchEngine(gate, max_batch_size=1)
    first = engine.submit(1, timeout_s=10)
    hurried = engine.submit(2, timeout_s=0.2)  # gathered with the first, expires behind it
    later = engine.submit(3, timeout_s=10)
    engine.start()
    try:
        assert gate.entered.wait(5)
        time.sleep(0.4)
        gate.open.set()
        assert first.result(5) == 1 and later.result(5) == 3
        with pytest.raises(RequestTimeout):
            hurried.result(5)
    finally:
        gate.open.set()
        engine.stop()
    assert gate.ran == [1, 3]  # the expired request never ran
    assert engine.metrics().timed_out == 1


def test_a_batch_that_never_returns_fails_everyone_waiting_and_marks_the_engine_unhealthy() -> None:
    never = threading.Event()  # set only to let the thread go at the end of the test

    def run(items: list[int]) -> BatchResult[int]:
        if 99 in items:
            never.wait(60)
        return BatchResult(items)

    engine = BatchEngine(run, max_batch_size=1, timeout_s=30, hang_s=0.3).start()
    try:
        stuck = engine.submit(99)
        queued = engine.submit(1)
        started = time.monotonic()
        with pytest.raises(EngineError, match="stopped responding"):
            stuck.result(5)
        # The one waiting behind it did nothing wrong: "unavailable", so a job worker retries
        # it later without counting an attempt.
        with pytest.raises(ModelUnavailable, match="stopped responding"):
            queued.result(5)
        assert time.monotonic() - started < 3  # the watchdog, not the 30 s request timeout
        assert not engine.healthy
        with pytest.raises(ModelUnavailable, match="unhealthy"):
            engine.submit(2)
        with pytest.raises(ModelUnavailable, match="unhealthy"):
            engine.run([2, 3])
        metrics = engine.metrics()
        assert metrics.hung_batches == 1 and metrics.failed == 2 and not metrics.healthy
        never.set()  # the model answers again: results of the failed requests are dropped
        deadline = time.monotonic() + 5
        while not engine.healthy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.run([4], timeout_s=5) == [4]
    finally:
        never.set()
        engine.stop()


def test_a_failing_batch_fails_its_requests_with_a_clear_error() -> None:
    def run(items: list[int]) -> BatchResult[int]:
        raise ValueError("boom")

    engine = BatchEngine(run, max_batch_size=4).start()
    try:
        with pytest.raises(EngineError, match="inference failed: ValueError"):
            engine.run([1, 2])
    finally:
        engine.stop()
    assert engine.metrics().failed == 2


def test_submit_after_stop_is_refused_and_queued_work_is_failed_not_dropped() -> None:
    engine: BatchEngine[int, int] = BatchEngine(lambda items: BatchResult(items))
    pending = engine.submit(1)  # never started
    engine.stop()
    with pytest.raises(ModelUnavailable, match="stopped"):
        pending.result(1)
    with pytest.raises(ModelUnavailable, match="stopped"):
        engine.submit(2)


class SlowPutQueue(queue.Queue[Any]):
    """A queue whose put lingers (until `go` or a short while) after saying it was entered:
    widens the window between a submit's checks and its put."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.go = threading.Event()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.entered.set()
        self.go.wait(0.3)
        super().put(item, block, timeout)


def test_a_request_submitted_while_the_engine_stops_is_failed_not_left_waiting() -> None:
    engine: BatchEngine[int, int] = BatchEngine(lambda items: BatchResult(items))
    slow = SlowPutQueue()
    engine._queue = slow  # noqa: SLF001 - the race needs a put that takes its time
    submitted: list[Any] = []
    submitter = threading.Thread(target=lambda: submitted.append(engine.submit(1)))
    submitter.start()
    assert slow.entered.wait(5)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()  # with submit's checks and put not atomic, stop drained an empty queue
    time.sleep(0.1)
    slow.go.set()
    submitter.join(5)
    stopper.join(5)
    assert len(submitted) == 1
    with pytest.raises(ModelUnavailable, match="stopped"):
        submitted[0].result(2)  # settled by stop(), not waiting out its 600 s timeout


def test_torch_out_of_memory_is_recognised() -> None:
    from cds_service.inference.engine import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(ValueError("out of memory"))
