"""Keeps the inference worker process alive beside the web tier (`cxr-cds serve`)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

log = logging.getLogger(__name__)
WORKER_COMMAND = (sys.executable, "-m", "cds_service.cli", "worker")
CONFIGURATION_ERROR_EXIT = 2  # what `cxr-cds` exits with on a ConfigurationError


class WorkerSupervisor:
    """Starts `cxr-cds worker` and starts it again whenever it exits (crash, OOM kill).
    Jobs of a dead worker are not lost: the queue hands a stale running job out again."""

    def __init__(self, restart_delay_s: float = 2.0) -> None:
        self._delay = restart_delay_s
        self._stop = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._process = subprocess.Popen(WORKER_COMMAND)
            code = self._process.wait()
            if self._stop.is_set():
                return
            if code == CONFIGURATION_ERROR_EXIT:
                # Restarting cannot fix a setting: say so once instead of looping.
                log.error(
                    "inference worker stopped on a configuration error (see above); "
                    "not restarting it: fix the setting and restart cxr-cds serve"
                )
                return
            log.warning("inference worker exited with %s; restarting in %.0f s", code, self._delay)
            self._stop.wait(self._delay)

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
