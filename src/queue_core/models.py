"""The queue's values: tasks, leases and what a worker reports."""

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class Task:
    """A pending task as handed to a processor. attempt counts this start too."""

    id: int
    batch_id: str
    payload: Any
    attempt: int
    enqueued_at: datetime
    # The lease's token: a processor that writes elsewhere can fence those writes with
    # (batch_id, fencing_token), refusing any token lower than one it has seen.
    fencing_token: int = 0


@dataclass(frozen=True)
class Lease:
    """The right to work one batch; fencing_token guards every write made under it."""

    batch_id: str
    worker_id: str
    fencing_token: int
    taken_over_from: str | None = None

    def log_fields(self, **more: object) -> dict[str, object]:
        """The keys every log record about this lease carries, plus more."""
        return {
            "batch_id": self.batch_id,
            "worker_id": self.worker_id,
            "lease_token": self.fencing_token,
            **more,
        }


class Outcome(StrEnum):
    """Why a worker stopped."""

    NO_WORK = "no_work"  # nothing claimable
    BATCH_BUSY = "batch_busy"  # claimable batches existed but their heads were held
    DRAINED = "drained"  # the batch ran empty
    TIME_UP = "time_up"  # the invocation's remaining time ran short
    TASK_FAILED = "task_failed"  # the head failed and waits for its retry
    DEAD_LETTERED = "dead_lettered"  # the head failed its last attempt: dead-lettered
    BATCH_HALTED = "batch_halted"  # the head failed its last attempt: the batch halted
    HEAD_WAITING = "head_waiting"  # the next head may not start yet: lease handed back
    LEASE_LOST = "lease_lost"  # the lease expired or was taken over
    DATABASE_ERROR = "database_error"  # the connection failed mid-batch


@dataclass(frozen=True)
class CompletedTask:
    task_id: int
    batch_id: str
    attempt: int
    duration_ms: float


@dataclass
class WorkReport:
    """What one worker invocation did."""

    worker_id: str
    outcome: Outcome = Outcome.NO_WORK
    batch_id: str | None = None
    fencing_token: int | None = None
    taken_over_from: str | None = None
    completed: list[CompletedTask] = field(default_factory=list)
    failed_task_id: int | None = None
    error: str | None = None
    # Applied by this invocation to heads whose attempts were used up.
    dead_lettered: list[int] = field(default_factory=list)
    halted_batch_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workerId": self.worker_id,
            "outcome": self.outcome.value,
            "batchId": self.batch_id,
            "fencingToken": self.fencing_token,
            "takenOverFrom": self.taken_over_from,
            "completed": [task.task_id for task in self.completed],
            "failedTaskId": self.failed_task_id,
            "error": self.error,
            "deadLettered": self.dead_lettered,
            "haltedBatches": self.halted_batch_ids,
        }
