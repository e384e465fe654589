"""Real servers for the tests: PostgreSQL and Redis on loopback, each on a free port with its
own temporary folder, stopped and deleted afterwards.

PostgreSQL comes from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``),
Redis from ``redis-server``; `make test` installs both. When one is missing, its tests fail
with a message saying so (`for_tests`), unless ``CXR_CDS_SKIP_POSTGRES=1`` /
``CXR_CDS_SKIP_REDIS=1`` skips them. PostgreSQL refuses to run as root: as root (CI), its
programs run as the ``postgres`` system user, which owns the temporary folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

POSTGRES_PACKAGE = "postgresql"
REDIS_PACKAGE = "redis-server"
SKIP_POSTGRES = "CXR_CDS_SKIP_POSTGRES"
SKIP_REDIS = "CXR_CDS_SKIP_REDIS"
START_TIMEOUT_S = 60
S = TypeVar("S")


class ServiceMissing(RuntimeError):
    """A server program the tests need is not installed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _missing(program: str, package: str, skip_env: str) -> ServiceMissing:
    return ServiceMissing(
        f"{program} is not installed: these tests run a real server. `make test` installs it "
        f"(Debian package `{package}`: apt-get install -y {package}); set {skip_env}=1 to "
        "skip them instead."
    )


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's programs (Debian: /usr/lib/postgresql/N/bin; else
    a pg_ctl on PATH)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    if found:
        return Path(max(found, key=version)).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    raise _missing("PostgreSQL (initdb, pg_ctl)", POSTGRES_PACKAGE, SKIP_POSTGRES)


def redis_server_binary() -> Path:
    found = shutil.which("redis-server")
    if not found:
        raise _missing("redis-server", REDIS_PACKAGE, SKIP_REDIS)
    return Path(found)


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` into ``root/data``, trust authentication on
    127.0.0.1 only, superuser ``postgres``, the socket in ``root``, durability off (fast)."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = 0
        self.user = "postgres"
        # PostgreSQL refuses to run as root: then its programs run as the postgres user.
        self.run_as: str | None = "postgres" if os.geteuid() == 0 else None

    # -- lifecycle --------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
            env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}"
                f"{result.stderr}\n{self.log_tail()}"
            )
        return result

    def init(self) -> None:
        if self.run_as:
            try:
                account = pwd.getpwnam(self.run_as)
            except KeyError:
                raise ServiceMissing(
                    "running as root, and there is no `postgres` system user to run "
                    f"PostgreSQL as (Debian package `{POSTGRES_PACKAGE}` creates it)"
                ) from None
            if not shutil.which("runuser"):
                raise ServiceMissing("running as root, and `runuser` (util-linux) is missing")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        # Fast, yet a crash-style stop (-m immediate, as the fault tests do) loses no
        # committed transaction: fsync off (nothing forced to disk; the OS still has it), but
        # synchronous_commit on (commits are in the WAL the OS holds before they return).
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "max_connections": "300",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tests/services.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        """Start on ``self.port`` (a free one the first time; the same one on restart)."""
        for attempt in range(3):
            if not self.port:
                self.port = free_port()
            result = self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-o",
                f"-p {self.port}",
                "start",
                check=False,
            )
            if result.returncode == 0:
                return
            if "could not bind" in self.log_tail() and attempt < 2:
                self.port = 0  # taken meanwhile by someone else: another free port
                continue
            raise RuntimeError(
                f"pg_ctl start exited {result.returncode}:\n{result.stdout}{result.stderr}\n"
                f"{self.log_tail()}"
            )

    def stop(self, mode: str = "fast") -> None:
        """``mode``: fast (clients disconnected, clean) or immediate (as if it crashed)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- databases --------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        # URL form: what CXR_CDS_DATABASE_URL takes (libpq reads both forms).
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop it, ending any session still connected to it."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_server(database: str = "cxr_cds_test") -> Iterator[PostgresServer]:
    """A running PostgreSQL with ``database`` created; stopped and deleted afterwards.
    ServiceMissing when PostgreSQL is not installed."""
    bin_dir = postgres_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="cxr-cds-pg-"))
    server = PostgresServer(bin_dir, root)
    try:
        server.init()
        server.start()
        server.create_database(database)
        yield server
    finally:
        if server.port and (server.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                server.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


class RedisServer:
    """A throwaway Redis: 127.0.0.1 only, no persistence (``--save '' --appendonly no``), its
    own folder; `restart` keeps the port (clients reconnect to the same URL)."""

    def __init__(self, binary: Path, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.log = root / "redis.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        for attempt in range(3):
            if not self.port:
                self.port = free_port()
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--protected-mode",
                    "yes",
                    "--dir",
                    str(self.root),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--logfile",
                    str(self.log),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return
            self._terminate(signal.SIGKILL)
            if attempt < 2 and "Address already in use" in self.log_tail():
                self.port = 0
                continue
            raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.02)
        return False

    def ping(self) -> bool:
        """Whether it answers PING (a raw RESP exchange: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _terminate(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (clean shutdown), or with ``kill`` SIGKILL (as if it crashed)."""
        self._terminate(signal.SIGKILL if kill else signal.SIGTERM)

    def restart(self, kill: bool = False) -> None:
        """Stop and start again on the same port; everything it held is gone (no
        persistence)."""
        self.stop(kill)
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A running Redis; stopped and its folder deleted afterwards. ServiceMissing when
    redis-server is not installed."""
    binary = redis_server_binary()
    root = Path(tempfile.mkdtemp(prefix="cxr-cds-redis-"))
    server = RedisServer(binary, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def for_tests(start: Callable[[], AbstractContextManager[S]], skip_env: str) -> Iterator[S]:
    """A server for a pytest fixture: skipped when ``skip_env`` is 1; when the server is not
    installed, a failure that says what to install (never a silent skip)."""
    if os.environ.get(skip_env) == "1":
        pytest.skip(f"{skip_env}=1: the tests that need this server are skipped")
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(start())
        except ServiceMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        yield server
