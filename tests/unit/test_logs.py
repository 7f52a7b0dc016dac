"""Log lines: JSON on request, with the projection they concern."""

from __future__ import annotations

import json
import logging

from projector.logs import JsonFormatter


def test_json_lines_carry_the_projection_of_their_thread() -> None:
    """Proves a JSON log line is one parseable object with level, logger, message and the
    projection taken from its worker thread's name."""
    record = logging.LogRecord(
        "projector.runner.worker", logging.WARNING, __file__, 1, "fenced: %s", ("t[0]",), None
    )
    record.threadName = "projection-accounts"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["msg"] == "fenced: t[0]"
    assert line["projection"] == "accounts" and line["logger"] == "projector.runner.worker"
