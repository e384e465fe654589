"""Keeps the inference worker process alive beside the web tier (`cxr-cds serve`)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

log = logging.getLogger(__name__)
WORKER_COMMAND = (sys.executable, "-m", "cds_service.cli", "worker")
CONFIGURATION_ERROR_EXIT = 2  # what `cxr-cds` exits with on a ConfigurationError
MAX_RESTART_DELAY_S = 60.0
STABLE_RUN_S = 60.0  # a worker that ran this long before dying starts again at once


def _last_words(lines: deque[str]) -> str:
    """The line that says why the worker died: its last (a traceback ends with the error)."""
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:300]
    return "no output"


class WorkerSupervisor:
    """Starts `cxr-cds worker` and starts it again whenever it exits (crash, OOM kill), after
    a delay that doubles while it keeps dying young (at most a minute). Jobs of a dead
    worker are not lost: their leases lapse and the queue hands them out again. Each exit is
    reported to ``on_exit`` (the service shows it in /readyz) with the worker's last words."""

    def __init__(
        self,
        restart_delay_s: float = 2.0,
        on_exit: Callable[[str], None] | None = None,
    ) -> None:
        self._first_delay = restart_delay_s
        self._delay = restart_delay_s
        self._on_exit = on_exit
        self._stop = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._thread.start()

    @staticmethod
    def _relay(stream: IO[bytes], lines: deque[str]) -> None:
        """Pass the worker's output through to ours, keeping its last lines."""
        for raw in iter(stream.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.buffer.flush()
            lines.append(raw.decode("utf-8", "replace"))

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            lines: deque[str] = deque(maxlen=50)
            self._process = subprocess.Popen(
                WORKER_COMMAND, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            assert self._process.stdout is not None
            relay = threading.Thread(
                target=self._relay, args=(self._process.stdout, lines), daemon=True
            )
            relay.start()
            code = self._process.wait()
            relay.join(5)
            if self._stop.is_set() or code == -signal.SIGTERM:
                # Asked to stop (a shutdown signals the whole process group): no restart.
                return
            if time.monotonic() - started >= STABLE_RUN_S:
                self._delay = self._first_delay  # it had been working: no backoff
            why = _last_words(lines)
            if code == CONFIGURATION_ERROR_EXIT:
                # Restarting cannot fix a setting: say so once instead of looping.
                message = f"inference worker stopped on a configuration error: {why}"
                log.error(
                    "%s; not restarting it: fix the setting and restart cxr-cds serve", message
                )
                self._report(message)
                return
            message = (
                f"inference worker exited with {code} ({why}); restarting in {self._delay:.0f} s"
            )
            log.warning("%s", message)
            self._report(message)
            self._stop.wait(self._delay)
            self._delay = min(self._delay * 2, MAX_RESTART_DELAY_S)

    def _report(self, message: str) -> None:
        if self._on_exit is None:
            return
        try:
            self._on_exit(message)
        except Exception:  # noqa: BLE001 - reporting must never stop the supervision
            log.exception("could not record the worker's exit")

    def stop(self) -> None:
        self._stop.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self._thread.join(15)
