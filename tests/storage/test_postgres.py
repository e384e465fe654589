"""What only the PostgreSQL adapters promise: claims by workers on many machines never
overlap, migrations are applied once whoever starts first, and a database that does not
answer raises one of ``storage.errors`` (what /readyz and the worker treat as "down"), then
is used again by itself once it is back."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import psycopg
import pytest

from cds_service.storage.ports import Storage
from cds_service.storage.postgres import DATABASE_DOWN, open_postgres_storage
from cds_service.storage.postgres.queue import PostgresJobQueue
from cds_service.storage.postgres.schema import MIGRATIONS, SCHEMA_VERSION, Migration, migrate
from tests.services import PostgresServer
from tests.storage.conftest import POOL_INSTALLED, close
from tests.storage.test_storage_contract import MODEL, STUDY, claim_one, ref, result

VARIANTS = [
    pytest.param(False, id="per-thread"),
    pytest.param(
        True,
        id="pool",
        marks=pytest.mark.skipif(not POOL_INSTALLED, reason="psycopg_pool is not installed"),
    ),
]


@pytest.fixture(params=VARIANTS)
def open_pg(request: pytest.FixtureRequest, postgres_dsn: str) -> Iterator[Callable[[], Storage]]:
    opened: list[Storage] = []

    def open_one() -> Storage:
        # A short wait for a pooled connection: every call while the server is down waits it.
        storage = open_postgres_storage(postgres_dsn, pooled=request.param, pool_wait_s=0.5)
        opened.append(storage)
        return storage

    yield open_one
    for storage in opened:
        close(storage)


def run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` in ``count`` threads released at once; their results (errors raised)."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            start.wait()
            results[index] = work(index)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


# -- claims ----------------------------------------------------------------------------------


def test_four_workers_claim_200_jobs_without_overlap(open_pg: Callable[[], Storage]) -> None:
    producer = open_pg()
    for number in range(200):
        producer.jobs.enqueue(ref(f"2.{number}"), MODEL, STUDY, None)
    machines = [open_pg() for _ in range(4)]  # each its own connections: another machine

    def drain(index: int) -> list[int]:
        store, mine = machines[index], list[int]()
        while batch := store.jobs.claim_batch(MODEL, 7, owner=f"machine-{index}"):
            mine.extend(job.id for job in batch)
            for job in batch:
                store.jobs.finish(job, result(job.ref.study_uid))
        return mine

    taken = run_together(4, drain)
    every = [job_id for ids in taken for job_id in ids]
    assert len(every) == len(set(every)) == 200  # union is every job, no job twice
    assert all(ids for ids in taken)  # they really ran side by side
    assert producer.jobs.job_counts(MODEL)["done"] == 200


def test_a_claim_skips_rows_another_claim_holds(postgres_dsn: str) -> None:
    storage = open_postgres_storage(postgres_dsn, pooled=False)
    try:
        for uid in ("a", "b"):
            storage.jobs.enqueue(ref(uid), MODEL, STUDY, None)
        with psycopg.connect(postgres_dsn) as other:  # a claim in progress elsewhere
            other.execute("SELECT id FROM jobs ORDER BY id LIMIT 1 FOR UPDATE")
            started = time.monotonic()
            job = claim_one(storage)
            assert job.ref.study_uid == "b"  # the locked one is skipped...
            assert time.monotonic() - started < 2  # ...not waited for
            other.rollback()
        assert claim_one(storage).ref.study_uid == "a"
    finally:
        close(storage)


def test_requeue_leaves_a_study_enqueued_meanwhile(postgres_dsn: str) -> None:
    storage = open_postgres_storage(postgres_dsn, pooled=False)
    try:
        storage.jobs.enqueue(ref("r"), MODEL, STUDY, None)
        storage.jobs.fail(claim_one(storage), "x", final=result("r", "failed", "x"))
        with psycopg.connect(postgres_dsn) as other:
            # A new live job for the study, not yet committed when requeue looks.
            other.execute(
                "INSERT INTO jobs (source, study_uid, model_id, model_version, study_resource, "
                "status, created_at, updated_at) VALUES (%s, 'r', %s, %s, '{}', 'queued', 0, 0)",
                (ref("r").source, MODEL.model_id, MODEL.version),
            )
            outcome: list[int] = []
            thread = threading.Thread(target=lambda: outcome.append(storage.jobs.requeue(MODEL)))
            thread.start()
            time.sleep(0.3)  # requeue now waits on the unique index for that insert
            other.commit()
            thread.join(timeout=10)
        assert outcome == [0]  # not requeued: the new job analyses the study
        kept = storage.results.get_result(ref("r"), MODEL)
        assert kept is not None and kept.result.status == "failed"
        assert storage.jobs.queue_depth(MODEL) == 1
    finally:
        close(storage)


# -- migrations ------------------------------------------------------------------------------


def migrations(dsn: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT version, applied_at::text FROM schema_migrations ORDER BY 1")
        return [(int(v), str(at)) for v, at in rows]


def test_migrations_are_recorded_once_and_reapplied_never(postgres_dsn: str) -> None:
    close(open_postgres_storage(postgres_dsn, pooled=False))
    first = migrations(postgres_dsn)
    assert [v for v, _ in first] == [m.version for m in MIGRATIONS]
    assert first[-1][0] == SCHEMA_VERSION
    close(open_postgres_storage(postgres_dsn, pooled=False))  # a second process starts
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert migrate(conn) == []
    assert migrations(postgres_dsn) == first  # nothing applied again


def test_each_step_is_its_own_transaction(postgres_dsn: str) -> None:
    later = Migration(
        100, "a new table", "CREATE TABLE later (x int); INSERT INTO later VALUES (1)"
    )
    broken = Migration(101, "fails half-way", "CREATE TABLE half (x int); SELECT 1 / 0")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert migrate(conn) == [m.version for m in MIGRATIONS]
        with pytest.raises(psycopg.errors.DivisionByZero):
            migrate(conn, (*MIGRATIONS, later, broken))
        # The step before the broken one is applied and recorded; the broken one left nothing.
        assert conn.execute("SELECT to_regclass('later') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT to_regclass('half') IS NULL").fetchone() == (True,)
        assert migrate(conn, (*MIGRATIONS, later)) == []
    assert [v for v, _ in migrations(postgres_dsn)][-1] == 100


def test_processes_starting_at_once_migrate_once(postgres_server: PostgresServer) -> None:
    # A slow step widens the window in which unlocked migrations would collide.
    slow = Migration(200, "slow", "SELECT pg_sleep(0.2); CREATE TABLE slow (x int)")
    for attempt in range(2):
        name = f"concurrent_migrations_{attempt}"
        dsn = postgres_server.create_database(name)
        try:

            def start(_: int, dsn: str = dsn) -> list[int]:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    return migrate(conn, (*MIGRATIONS, slow))

            applied = run_together(6, start)
            every = sorted(v for versions in applied for v in versions)
            assert every == sorted([m.version for m in MIGRATIONS] + [200])
            assert [v for v, _ in migrations(dsn)] == every
        finally:
            postgres_server.drop_database(name)


def test_storages_opened_at_once_share_one_schema(postgres_dsn: str) -> None:
    stores = run_together(4, lambda _: open_postgres_storage(postgres_dsn, pooled=False))
    try:
        assert stores[0].jobs.enqueue(ref("m"), MODEL, STUDY, None)
        assert not stores[3].jobs.enqueue(ref("m"), MODEL, STUDY, None)
    finally:
        for store in stores:
            close(store)


# -- the database down -----------------------------------------------------------------------


def every_port(storage: Storage) -> list[Callable[[], object]]:
    """A call on each port: reads and writes."""
    return [
        lambda: storage.jobs.queue_depth(MODEL),
        lambda: storage.jobs.enqueue(ref("down"), MODEL, STUDY, None),
        lambda: storage.jobs.claim_batch(MODEL, 5),
        lambda: storage.workers.alive(MODEL.label, 60),
        lambda: storage.workers.heartbeat("w", MODEL.label),
        lambda: storage.results.put_result(ref("down"), result("down")),
        lambda: storage.results.get_result(ref("down"), MODEL),
        lambda: storage.cards.card_record("u"),
        lambda: storage.feedback.feedback_count(),
        lambda: storage.replay.remember_jti("iss", f"jti-{time.monotonic()}", 0),
        lambda: storage.cursors.watch_cursor("src"),
    ]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_stopped_server_raises_storage_errors_then_recovers(
    open_pg: Callable[[], Storage], postgres_server: PostgresServer, mode: str
) -> None:
    storage = open_pg()
    assert storage.errors == DATABASE_DOWN
    for call in every_port(storage):
        call()  # connected and working
    postgres_server.stop(mode)
    try:
        for call in every_port(storage):
            started = time.monotonic()
            with pytest.raises(storage.errors):
                call()
            assert time.monotonic() - started < 5  # answered, not hung
        # A thread that never connected gets the same answer.
        outcome: list[BaseException] = []

        def fresh() -> None:
            try:
                storage.jobs.queue_depth(MODEL)
            except BaseException as exc:  # noqa: BLE001  # what it raised is the point
                outcome.append(exc)

        thread = threading.Thread(target=fresh)
        thread.start()
        thread.join(timeout=30)
        assert len(outcome) == 1 and isinstance(outcome[0], storage.errors)
    finally:
        postgres_server.start()
    # Back: with a connection per thread every call works at once (the dropped connections
    # are replaced by themselves); a pool gets there when its background reconnection runs.
    pooled = cast(PostgresJobQueue, storage.jobs).db.pooled
    deadline = time.monotonic() + (30 if pooled else 0)
    for call in every_port(storage):
        while True:
            try:
                call()
                break
            except storage.errors:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    assert storage.jobs.queue_depth(MODEL) == 1


def test_only_an_unanswering_database_counts_as_down() -> None:
    # Outages and transient conflicts: the worker waits them out, /readyz reports them.
    for down in (
        psycopg.OperationalError,
        psycopg.errors.AdminShutdown,
        psycopg.errors.DeadlockDetected,
        psycopg.errors.QueryCanceled,
        psycopg.InterfaceError,
    ):
        assert issubclass(down, DATABASE_DOWN), down
    # Bugs are not outages: they must surface, not be retried forever.
    for bug in (psycopg.errors.UniqueViolation, psycopg.errors.UndefinedTable, psycopg.DataError):
        assert not issubclass(bug, DATABASE_DOWN), bug


def backend_pid(storage: Storage) -> int:
    row = cast(PostgresJobQueue, storage.jobs).db.read_one("SELECT pg_backend_pid()")
    assert row is not None
    return int(row[0])


def _child_uses(storage: Storage, answers: Any) -> None:
    storage.jobs.enqueue(ref("from-child"), MODEL, STUDY, None)
    answers.put(backend_pid(storage))


def test_a_forked_process_uses_connections_of_its_own(postgres_dsn: str) -> None:
    storage = open_postgres_storage(postgres_dsn, pooled=False)
    try:
        storage.jobs.enqueue(ref("from-parent"), MODEL, STUDY, None)  # the parent connected
        parent = backend_pid(storage)
        context = multiprocessing.get_context("fork")
        answers = context.Queue()
        child = context.Process(target=_child_uses, args=(storage, answers))
        child.start()
        child_backend = answers.get(timeout=30)
        child.join(timeout=30)
        assert child.exitcode == 0
        assert child_backend != parent  # its own connection...
        assert backend_pid(storage) == parent  # ...and the parent's still open, unharmed
        assert storage.jobs.queue_depth(MODEL) == 2
    finally:
        close(storage)
