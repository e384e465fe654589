"""Run the service under gunicorn from Python (`cxr-cds serve`)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from cds_service.config import Settings
from cds_service.observability.logs import JsonFormatter
from cds_service.observability.multiproc import process_exited
from cds_service.web.app import create_app


class _Application(BaseApplication):
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self._settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self._settings)


class JsonLogger(Logger):
    """gunicorn's own log lines (start, worker boot and exit) as JSON, like the service's
    (CXR_CDS_LOG_FORMAT=json)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())


def _child_exit(server: Any, worker: Any) -> None:
    """A web worker ended: Prometheus multiprocess bookkeeping for its pid."""
    process_exited(worker.pid)


def run_gunicorn(settings: Settings, *, bind: str, workers: int, threads: int = 4) -> None:
    """Web workers hold no model: they only read results and queue jobs (ARCHITECTURE.md)."""
    _Application(
        settings,
        {
            "bind": bind,
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread",
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "limit_request_field_size": 16384,
            "child_exit": _child_exit,
            "logger_class": JsonLogger if settings.log_format == "json" else Logger,
        },
    ).run()
