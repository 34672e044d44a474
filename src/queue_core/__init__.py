"""An ordered task queue on PostgreSQL: one owner per batch, strict FIFO inside a batch.

This package knows nothing of Lambda; src/handler/ is the Lambda edge.
"""

from queue_core.config import Settings
from queue_core.db import ConnectionHolder, connect
from queue_core.enqueue import enqueue, enqueue_many
from queue_core.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidInput,
    QueueError,
    UnknownBatch,
)
from queue_core.migrations import migrate
from queue_core.models import Lease, Outcome, Task, WorkReport
from queue_core.validation import BATCH_ID_PATTERN, check_batch_id
from queue_core.worker import Worker

__all__ = [
    "BATCH_ID_PATTERN",
    "ConfigurationError",
    "ConnectionHolder",
    "DatabaseUnavailable",
    "InvalidInput",
    "Lease",
    "Outcome",
    "QueueError",
    "Settings",
    "Task",
    "UnknownBatch",
    "WorkReport",
    "Worker",
    "check_batch_id",
    "connect",
    "enqueue",
    "enqueue_many",
    "migrate",
]
