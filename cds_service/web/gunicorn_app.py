"""Run the service under gunicorn from Python (`cxr-cds serve`)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from cds_service.config import Settings
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
        },
    ).run()
