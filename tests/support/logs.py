"""The handler's structured log, captured as CloudWatch would receive it."""

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class HandlerLog:
    """The JSON lines that the Powertools logger wrote, queue_core's included."""

    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream

    def text(self) -> str:
        return self._stream.getvalue()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.strip()]

    def actions(self) -> list[str]:
        return [record.get("action") for record in self.records()]


@contextmanager
def captured_handler_log() -> Iterator[HandlerLog]:
    """Everything handler.app's logger (and the loggers it configured) writes."""
    import handler.app as app

    stream = io.StringIO()
    log_handler = app.logger.registered_handler
    previous = log_handler.setStream(stream)
    try:
        yield HandlerLog(stream)
    finally:
        log_handler.setStream(previous)
