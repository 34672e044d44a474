"""What an operator reads and does: per-batch stats, leases, the queue's gauges.

Each function takes the caller's connection and returns plain values, so the command
line, the Lambda handler's metrics and tests share them. Writes are single statements
that fence the former owner with a new token, so they are safe while workers run.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import dict_row

from queue_core.errors import QueueError
from queue_core.queries import query
from queue_core.validation import check_batch_id

log = logging.getLogger(__name__)

# An operator's write waits at most this long for a worker's row lock, then gives up.
OPERATOR_LOCK_TIMEOUT = "5s"


class UnknownBatch(QueueError):
    """No batch of that name has ever had a task."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"batch {batch_id!r} does not exist")
        self.batch_id = batch_id


class LeaseNotHeld(QueueError):
    """The lease is free, or held by someone other than the operator expected."""


@dataclass(frozen=True)
class BatchStats:
    batch_id: str
    pending: int
    oldest_pending_age: timedelta | None
    owner: str | None
    lease_expires_at: datetime | None
    lease_expired: bool
    head_id: int | None
    head_attempts: int | None
    head_last_error: str | None
    head_retry_at: datetime | None

    @property
    def blocked(self) -> bool:
        """The head has failed: nothing later in the batch runs until it succeeds."""
        return self.head_last_error is not None


@dataclass(frozen=True)
class LeaseRow:
    batch_id: str
    owner: str | None
    fencing_token: int
    locked_at: datetime | None
    expires_at: datetime | None
    expired: bool
    pending: int


@dataclass(frozen=True)
class ReleasedLease:
    batch_id: str
    previous_owner: str
    fencing_token: int


@dataclass(frozen=True)
class QueueGauges:
    pending: int
    oldest_pending_seconds: float


def batch_stats(
    conn: psycopg.Connection, lease_seconds: float, batch_id: str | None = None
) -> list[BatchStats]:
    """Every batch (or one), in name order."""
    if batch_id is not None:
        check_batch_id(batch_id, "--batch")
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            query("batch_stats"),
            {"lease_seconds": lease_seconds, "batch_id": batch_id},
        ).fetchall()
    if batch_id is not None and not rows:
        raise UnknownBatch(batch_id)
    return [BatchStats(**row) for row in rows]


def list_leases(
    conn: psycopg.Connection, lease_seconds: float, all_leases: bool = False
) -> list[LeaseRow]:
    """Held leases (expired ones included), or every lease row with all_leases."""
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            query("list_leases"),
            {"lease_seconds": lease_seconds, "all_leases": all_leases},
        ).fetchall()
    return [LeaseRow(**row) for row in rows]


def release_lease(
    conn: psycopg.Connection, batch_id: str, expected_owner: str | None = None
) -> ReleasedLease:
    """Free a batch's lease now, whoever holds it (or only expected_owner).

    The new fencing token stops the former owner: it can no longer renew, complete or
    delete. A task it is still processing keeps its row lock until that transaction
    ends, so no other worker starts it meanwhile; its work is then rolled back and
    the task is processed again by the next owner.
    """
    check_batch_id(batch_id, "batch")
    with conn.transaction():
        conn.execute(
            query("set_local_lock_timeout"), {"lock_timeout": OPERATOR_LOCK_TIMEOUT}
        )
        row = conn.execute(
            query("force_release_lease"),
            {"batch_id": batch_id, "expected_owner": expected_owner},
        ).fetchone()
        if row is None:
            _explain_refusal(conn, batch_id, expected_owner)
    previous_owner, fencing_token = row
    log.info(
        "lease released by an operator",
        extra={
            "action": "lease_force_released",
            "batch_id": batch_id,
            "previous_owner": previous_owner,
            "lease_token": fencing_token,
        },
    )
    return ReleasedLease(batch_id, previous_owner, fencing_token)


def queue_gauges(conn: psycopg.Connection) -> QueueGauges:
    """Pending tasks in all batches, and the age of the oldest; one query."""
    pending, oldest = conn.execute(query("queue_gauges")).fetchone()
    return QueueGauges(int(pending), float(oldest))


def _explain_refusal(
    conn: psycopg.Connection, batch_id: str, expected_owner: str | None
) -> None:
    row = conn.execute(query("lease_owner"), {"batch_id": batch_id}).fetchone()
    if row is None:
        raise UnknownBatch(batch_id)
    (owner,) = row
    if owner is None:
        raise LeaseNotHeld(f"the lease of batch {batch_id!r} is not held")
    raise LeaseNotHeld(
        f"the lease of batch {batch_id!r} is held by {owner!r}, not {expected_owner!r}"
    )
