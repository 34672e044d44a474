"""Task processors for tests: TASK_PROCESSOR=tests.support.processors:<name>.

Each start and end of a task is appended as one JSON line to the file named by
RECORD_FILE. Each line is one write() on a descriptor opened with O_APPEND, so lines of
concurrent processes never interleave and the file order is the order of the writes.
"""

import json
import os
import signal
import time
from typing import Any

from queue_core.models import Task


def record(task: Task) -> None:
    """Record the start, sleep RECORD_SLEEP_SECONDS, record the end."""
    _append(task, "start")
    time.sleep(float(os.environ.get("RECORD_SLEEP_SECONDS", "0")))
    _append(task, "end")


def record_or_fail(task: Task) -> None:
    """Like record, but raise for a payload {"fail": true} or {"fail_attempts": n}.

    {"fail": true} fails every attempt; {"fail_attempts": n} fails the first n attempts.
    """
    _append(task, "start")
    payload = task.payload if isinstance(task.payload, dict) else {}
    if payload.get("fail") is True or task.attempt <= payload.get("fail_attempts", 0):
        _append(task, "fail")
        raise RuntimeError(f"task {task.id} asked to fail on attempt {task.attempt}")
    time.sleep(float(os.environ.get("RECORD_SLEEP_SECONDS", "0")))
    _append(task, "end")


def record_or_die(task: Task) -> None:
    """Like record, but a payload {"die": true} kills the worker process (SIGKILL)."""
    _append(task, "start")
    payload = task.payload if isinstance(task.payload, dict) else {}
    if payload.get("die") is True:
        _append(task, "die")
        os.kill(os.getpid(), signal.SIGKILL)
    _append(task, "end")


def _append(task: Task, event: str) -> None:
    line = {
        "event": event,
        "task_id": task.id,
        "batch_id": task.batch_id,
        "attempt": task.attempt,
        "payload": task.payload,
        "pid": os.getpid(),
        "worker": os.environ.get("RECORD_WORKER", f"pid-{os.getpid()}"),
        "ts": time.time(),
    }
    data = (json.dumps(line) + "\n").encode()
    fd = os.open(
        os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
    )
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_records(path: os.PathLike | str) -> list[dict[str, Any]]:
    """The lines a recording processor wrote, in file order; [] before the first."""
    try:
        with open(path, encoding="utf-8") as stream:
            return [json.loads(line) for line in stream if line.strip()]
    except FileNotFoundError:
        return []
