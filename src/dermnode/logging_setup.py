"""Logging configuration: plain or JSON lines, one audit logger (``dermnode.audit``).

dermnode never logs patient names or IDs at INFO level or above; identifiers in logs are UIDs, AE titles and
peer addresses.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

from dermnode.settings import LoggingSettings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(settings: LoggingSettings) -> None:
    """Install a single stderr handler on the root logger according to ``settings``."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # pynetdicom is chatty at INFO and logs dataset summaries at DEBUG: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom narrates every module it copies at INFO: keep the service log about the service.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
