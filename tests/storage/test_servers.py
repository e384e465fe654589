"""The real servers the tests start (tests/services.py): up on loopback, restartable, gone
afterwards; and a missing one fails its tests saying what to install."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from tests import services

started = contextmanager(services.for_tests)  # stopped even when the test fails


def test_redis_starts_answers_restarts_and_stops() -> None:
    with started(services.redis_server, services.SKIP_REDIS) as server:
        root = server.root
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.set("k", "v")
        port = server.port
        server.restart()
        assert server.port == port
        assert client.ping()  # the client reconnects to the same URL
        assert client.get("k") is None  # nothing persisted
        client.set("k", "v")
        server.restart(kill=True)  # as if it crashed
        assert client.ping() and client.get("k") is None
        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.ping()
        client.close()
    assert not root.exists()


def test_postgres_keeps_data_across_a_restart_and_is_removed_after(
    postgres_server: services.PostgresServer,
) -> None:
    dsn = postgres_server.create_database("restart_check")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
            rows = conn.execute("SELECT name, setting FROM pg_settings").fetchall()
        settings: dict[str, str] = dict(rows)
        assert settings["listen_addresses"] == "127.0.0.1"
        assert settings["fsync"] == "off"
        assert settings["unix_socket_directories"] == str(postgres_server.root)
        if os.geteuid() == 0:  # PostgreSQL runs as its own user, which owns the folder
            assert postgres_server.run_as == "postgres"
            assert postgres_server.data.stat().st_uid == services.pwd.getpwnam("postgres").pw_uid
        port = postgres_server.port
        postgres_server.restart("immediate")  # committed data survives even a crash
        assert postgres_server.port == port and postgres_server.running()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
    finally:
        postgres_server.drop_database("restart_check")


def test_a_server_folder_is_deleted_afterwards() -> None:
    with started(services.postgres_server, services.SKIP_POSTGRES) as server:
        root: Path = server.root
        assert (server.data / "PG_VERSION").exists()
    assert not root.exists()


def test_missing_postgres_fails_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(services.shutil, "which", lambda name: None)
    monkeypatch.delenv(services.SKIP_POSTGRES, raising=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        next(services.for_tests(services.postgres_server, services.SKIP_POSTGRES))
    message = str(failed.value)
    assert "make test" in message and "`postgresql`" in message
    assert services.SKIP_POSTGRES in message
    # Only when asked: skipped instead.
    monkeypatch.setenv(services.SKIP_POSTGRES, "1")
    with pytest.raises(pytest.skip.Exception):
        next(services.for_tests(services.postgres_server, services.SKIP_POSTGRES))


def test_missing_redis_fails_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services.shutil, "which", lambda name: None)
    monkeypatch.delenv(services.SKIP_REDIS, raising=False)
    with pytest.raises(pytest.fail.Exception, match="redis-server"):
        next(services.for_tests(services.redis_server, services.SKIP_REDIS))
