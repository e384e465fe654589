"""Prometheus multiprocess mode for `cxr-cds serve` (its gunicorn workers and its inference
worker are separate processes that must report on one /metrics).

prometheus_client chooses, when it is first imported, whether a process keeps its values in
memory or in files under PROMETHEUS_MULTIPROC_DIR: so this module never imports it at the
top, and `use_multiprocess_dir` runs before anything imports cds_service.observability.metrics.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def default_multiprocess_dir(database: Path) -> Path:
    """Beside the database: var/prometheus for the default var/cxr-cds.sqlite3."""
    return database.parent / "prometheus"


def use_multiprocess_dir(default: Path) -> Path:
    """Make this process, and every process it starts, write metrics under one directory:
    PROMETHEUS_MULTIPROC_DIR when set, else ``default``. Values left there by an earlier
    run are removed (they would be counted again)."""
    directory = Path(os.environ.get(MULTIPROC_ENV) or default)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    if "prometheus_client" in sys.modules:
        log.warning(
            "prometheus_client was imported before %s was set: this process's metrics stay "
            "in memory and do not reach /metrics",
            MULTIPROC_ENV,
        )
    return directory


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def process_exited(pid: int) -> None:
    """Bookkeeping when a process writing metrics ends (gunicorn's child_exit hook): its
    live gauges are dropped; its counters and histograms keep counting in the totals."""
    directory = multiprocess_dir()
    if directory is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)
