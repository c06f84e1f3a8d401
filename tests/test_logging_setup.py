from __future__ import annotations

import json
import logging

import pytest

from dermnode.logging_setup import configure_logging
from dermnode.settings import LoggingSettings


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingSettings(level="INFO", json=True))
    logging.getLogger("dermnode.audit").info("C-STORE from %s status=0x%04X", "MODALITY", 0)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("dermnode.x").exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["logger"] == "dermnode.audit" and lines[0]["message"] == "C-STORE from MODALITY status=0x0000"
    assert lines[1]["level"] == "ERROR" and "ValueError: boom" in lines[1]["exception"]
    assert logging.getLogger("pynetdicom").level == logging.WARNING
    configure_logging(LoggingSettings())
