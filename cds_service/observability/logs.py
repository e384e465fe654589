"""How the service's log lines look: text for people, or one JSON object a line for a log
collector (CXR_CDS_LOG_FORMAT=json).

Log lines never carry PHI at INFO or above (no patient ids, study UIDs, names or tokens: a
count, a job id or an error type instead); the format changes nothing about that.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from cds_service.errors import ConfigurationError

if TYPE_CHECKING:
    from cds_service.config import Settings

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
HANDLER_NAME = "cxr-cds"  # the root handler configure_logging installs (and replaces)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, process,
    and the traceback as ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    settings_or_format: Settings | str, level: int | None = None, stream: TextIO | None = None
) -> None:
    """Send every log record to ``stream`` (standard error) in the given format ("text" or
    "json", or the settings' CXR_CDS_LOG_FORMAT), in place of the handler an earlier call
    installed (others, e.g. pytest's, stay); ``level`` None keeps the root logger's level."""
    log_format = (
        settings_or_format if isinstance(settings_or_format, str) else settings_or_format.log_format
    )
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(f"CXR_CDS_LOG_FORMAT must be one of {LOG_FORMATS}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level)
    # werkzeug's access log prints query strings (patient ids): keep it off INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
