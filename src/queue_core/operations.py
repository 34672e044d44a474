"""What an operator reads and does: stats, leases, halted batches, dead letters.

Each function takes the caller's connection and returns plain values, so the command
line and tests share them. Everything here is safe while workers run.

Each action on a batch is one short transaction that locks the batch's lease row first
and, after that, never waits for a task row: a task a worker holds is skipped and
reported (SKIP LOCKED). That keeps every lock wait one-way: a worker in a task holds
its head row and may wait for the lease row (to complete the task); a claim takes a
lease row and a head row but never waits for either; an operator holds the lease row
and waits for no task. No cycle, so no deadlock. The wait for the lease row itself is
bounded (OPERATOR_LOCK_TIMEOUT): an operator never queues behind a worker for long.

Actions that take work away from an owner (releasing its lease) raise the fencing token,
so the former owner's later writes change nothing; its task in flight stays pending.
Nothing is deleted without a trace except by purge_dead_letters: cancelling a batch
moves its tasks to the dead letters, from where they can be redriven.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from queue_core.config import EXHAUSTION_POLICIES
from queue_core.errors import InvalidInput, QueueError, UnknownBatch
from queue_core.queries import query
from queue_core.validation import check_batch_id

log = logging.getLogger(__name__)

# An operator's action waits at most this long for a worker's lock on the lease row,
# then gives up without changing anything.
OPERATOR_LOCK_TIMEOUT = "5s"
MAX_ATTEMPTS_LIMIT = 1000
# Tells set_batch_policy to leave a setting as it is.
UNCHANGED: Any = object()


class LeaseNotHeld(QueueError):
    """The lease is held by someone other than the operator expected."""


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
    halted_at: datetime | None = None
    halt_reason: str | None = None
    dead_letters: int = 0

    @property
    def halted(self) -> bool:
        """The batch's policy halted it; it runs again once an operator resumes it."""
        return self.halted_at is not None

    @property
    def head_failed(self) -> bool:
        """The head failed in its current set of attempts (a resume or a redrive gives
        it a fresh set, and keeps its last error only for the record)."""
        return self.head_last_error is not None and bool(self.head_attempts)

    @property
    def blocked(self) -> bool:
        """Nothing later in the batch runs: it is halted, or its head has failed and
        must succeed first."""
        return self.halted or self.head_failed


@dataclass(frozen=True)
class BatchView:
    """A batch as an operator sees it: lease, policy, halt, head and dead letters."""

    batch_id: str
    owner: str | None
    fencing_token: int
    lease_live: bool
    lease_expires_at: datetime | None
    max_attempts: int | None
    on_exhausted: str | None
    halted_at: datetime | None
    halt_reason: str | None
    pending: int
    head_id: int | None
    head_attempts: int | None
    head_not_before: datetime | None
    head_last_error: str | None
    dead_letters: int

    @property
    def expired(self) -> bool:
        """Held, but not renewed in time: the next claim takes it over."""
        return self.owner is not None and not self.lease_live


@dataclass(frozen=True)
class ReleasedLease:
    batch_id: str
    previous_owner: str
    fencing_token: int


@dataclass(frozen=True)
class QueueGauges:
    pending: int
    oldest_pending_seconds: float


@dataclass(frozen=True)
class DeadLetter:
    """A task taken out of its batch, with what is known of its failures."""

    id: int
    batch_id: str
    payload: Any
    enqueued_at: datetime
    attempts: int
    last_error: str | None
    first_failed_at: datetime | None
    last_failed_at: datetime | None
    dead_lettered_at: datetime
    reason: str


@dataclass(frozen=True)
class Resumed:
    batch_id: str
    was_halted: bool
    head_id: int | None = None
    # The head was held by another transaction, so its attempts were not reset.
    head_held: bool = False


@dataclass(frozen=True)
class Cancelled:
    batch_id: str
    cancelled: list[int] = field(default_factory=list)
    # Still pending: tasks held by a worker at the time, left to finish or fail.
    in_flight: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------- reading


def batch_stats(
    conn: psycopg.Connection, lease_seconds: float, batch_id: str | None = None
) -> list[BatchStats]:
    """Every batch (or one), in name order, with its halt and dead letters."""
    if batch_id is not None:
        check_batch_id(batch_id, "--batch")
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            query("batch_stats"),
            {"lease_seconds": lease_seconds, "batch_id": batch_id},
        ).fetchall()
    if batch_id is not None and not rows:
        raise UnknownBatch(batch_id)
    # The halt and the dead letters come from the operator's view of the batches.
    views = {
        view.batch_id: view for view in list_batches(conn, lease_seconds, batch_id)
    }
    stats = []
    for row in rows:
        view = views.get(row["batch_id"])
        if view is not None:
            row |= {
                "halted_at": view.halted_at,
                "halt_reason": view.halt_reason,
                "dead_letters": view.dead_letters,
            }
        stats.append(BatchStats(**row))
    return stats


def list_batches(
    conn: psycopg.Connection, lease_seconds: float, batch_id: str | None = None
) -> list[BatchView]:
    """Every batch (or one), in name order."""
    if batch_id is not None:
        check_batch_id(batch_id)
    rows = conn.execute(
        query("list_batches"), {"lease_seconds": lease_seconds, "batch_id": batch_id}
    ).fetchall()
    return [BatchView(*row) for row in rows]


def list_leases(
    conn: psycopg.Connection,
    lease_seconds: float,
    all_leases: bool = False,
    batch_id: str | None = None,
) -> list[BatchView]:
    """Held leases (expired ones included), or every batch with all_leases, or the one
    batch named (held or not; UnknownBatch when it does not exist)."""
    if batch_id is not None:
        check_batch_id(batch_id, "--batch")
    views = list_batches(conn, lease_seconds, batch_id)
    if batch_id is not None:
        if not views:
            raise UnknownBatch(batch_id)
        return views
    return views if all_leases else [view for view in views if view.owner is not None]


def list_dead_letters(
    conn: psycopg.Connection, batch_id: str | None = None, limit: int = 1000
) -> list[DeadLetter]:
    """Dead letters (of one batch, or all), in batch and original order."""
    if batch_id is not None:
        check_batch_id(batch_id)
    rows = conn.execute(
        query("list_dead_letters"), {"batch_id": batch_id, "limit": limit}
    ).fetchall()
    return [DeadLetter(*row) for row in rows]


def queue_gauges(conn: psycopg.Connection) -> QueueGauges:
    """Pending tasks in all batches, and the age of the oldest; one query."""
    pending, oldest = conn.execute(query("queue_gauges")).fetchone()
    return QueueGauges(int(pending), float(oldest))


# ----------------------------------------------------------------------- acting


def release_lease(
    conn: psycopg.Connection, batch_id: str, expected_owner: str | None = None
) -> ReleasedLease | None:
    """Take the batch's lease from its owner now, live or expired (only from
    expected_owner, when given); None when nobody holds it.

    The new fencing token stops the former owner: it can no longer renew, complete or
    delete. A task it is still processing keeps its row lock until that transaction
    ends, so no other worker starts it meanwhile; its work is then rolled back and
    the task is processed again by the next owner.
    """
    check_batch_id(batch_id)
    with conn.transaction():
        owner = _lock_batch(conn, batch_id)[1]
        if owner is None:
            return None
        if expected_owner is not None and owner != expected_owner:
            raise LeaseNotHeld(
                f"the lease of batch {batch_id!r} is held by {owner!r}, "
                f"not {expected_owner!r}"
            )
        (fencing_token,) = conn.execute(
            query("revoke_lease"), {"batch_id": batch_id}
        ).fetchone()
    log.info(
        "lease released by an operator",
        extra={
            "action": "lease_revoked",
            "batch_id": batch_id,
            "previous_owner": owner,
            "lease_token": fencing_token,
        },
    )
    return ReleasedLease(batch_id, owner, fencing_token)


def resume_batch(conn: psycopg.Connection, batch_id: str) -> Resumed:
    """Lift a batch's halt; its head gets a fresh set of attempts."""
    check_batch_id(batch_id)
    with conn.transaction():
        halted_at = _lock_batch(conn, batch_id)[2]
        if halted_at is None:
            return Resumed(batch_id, was_halted=False)
        head_id, reset_id, _resumed = conn.execute(
            query("resume_batch"), {"batch_id": batch_id}
        ).fetchone()
    result = Resumed(
        batch_id,
        was_halted=True,
        head_id=head_id,
        head_held=head_id is not None and reset_id is None,
    )
    log.info(
        "batch resumed by an operator",
        extra={
            "action": "batch_resumed",
            "batch_id": batch_id,
            "task_id": head_id,
            "head_held": result.head_held,
        },
    )
    return result


def cancel_batch(conn: psycopg.Connection, batch_id: str) -> Cancelled:
    """Move the batch's pending tasks to the dead letters, as cancelled."""
    check_batch_id(batch_id)
    with conn.transaction():
        _lock_batch(conn, batch_id)
        cancelled = _ids(conn.execute(query("cancel_batch"), {"batch_id": batch_id}))
        left = _ids(conn.execute(query("pending_task_ids"), {"batch_id": batch_id}))
    log.info(
        "batch cancelled by an operator",
        extra={
            "action": "batch_cancelled",
            "batch_id": batch_id,
            "cancelled": len(cancelled),
            "in_flight": left,
        },
    )
    return Cancelled(batch_id, cancelled, left)


def set_batch_policy(
    conn: psycopg.Connection,
    batch_id: str,
    max_attempts: int | None = UNCHANGED,
    on_exhausted: str | None = UNCHANGED,
) -> tuple[int | None, str | None]:
    """Set the batch's own attempt limit and policy; None means the deployment's.

    Returns the batch's settings after the change.
    """
    check_batch_id(batch_id)
    if max_attempts is not UNCHANGED and max_attempts is not None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise InvalidInput("maxAttempts", "must be a whole number")
        if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise InvalidInput(
                "maxAttempts", f"must be between 1 and {MAX_ATTEMPTS_LIMIT}"
            )
    if on_exhausted is not UNCHANGED and on_exhausted not in (
        None,
        *EXHAUSTION_POLICIES,
    ):
        raise InvalidInput(
            "onExhausted", f"must be one of {', '.join(EXHAUSTION_POLICIES)}"
        )

    with conn.transaction():
        row = conn.execute(
            query("set_batch_policy"),
            {
                "batch_id": batch_id,
                "max_attempts": None if max_attempts is UNCHANGED else max_attempts,
                "on_exhausted": None if on_exhausted is UNCHANGED else on_exhausted,
                "set_max_attempts": max_attempts is not UNCHANGED,
                "set_on_exhausted": on_exhausted is not UNCHANGED,
            },
        ).fetchone()
    log.info(
        "batch policy set",
        extra={
            "action": "batch_policy_set",
            "batch_id": batch_id,
            "max_attempts": row[0],
            "on_exhausted": row[1],
        },
    )
    return row[0], row[1]


def redrive_dead_letters(
    conn: psycopg.Connection,
    batch_id: str | None = None,
    ids: Sequence[int] | None = None,
) -> dict[str, list[int]]:
    """Put dead letters back in their batches, each in its original place.

    One transaction per batch; returns the ids put back, by batch.
    """
    if batch_id is not None:
        check_batch_id(batch_id)
    wanted = _check_ids(ids)
    batches = [
        row[0]
        for row in conn.execute(query("dead_letter_batches"), {"batch_id": batch_id})
    ]
    redriven: dict[str, list[int]] = {}
    for batch in batches:
        with conn.transaction():
            _lock_batch(conn, batch)
            revived = _ids(
                conn.execute(query("redrive_batch"), {"batch_id": batch, "ids": wanted})
            )
        if revived:
            redriven[batch] = sorted(revived)
            log.info(
                "dead letters redriven by an operator",
                extra={
                    "action": "dead_letters_redriven",
                    "batch_id": batch,
                    "task_ids": redriven[batch],
                },
            )
    return redriven


def purge_dead_letters(
    conn: psycopg.Connection,
    batch_id: str | None = None,
    ids: Sequence[int] | None = None,
) -> list[int]:
    """Delete dead letters for good; returns their ids."""
    if batch_id is not None:
        check_batch_id(batch_id)
    wanted = _check_ids(ids)
    with conn.transaction():
        purged = _ids(
            conn.execute(
                query("purge_dead_letters"), {"batch_id": batch_id, "ids": wanted}
            )
        )
    log.info(
        "dead letters purged by an operator",
        extra={
            "action": "dead_letters_purged",
            "batch_id": batch_id,
            "purged": len(purged),
        },
    )
    return sorted(purged)


# ----------------------------------------------------------------------- helpers


def _lock_batch(conn: psycopg.Connection, batch_id: str) -> tuple:
    """Lock the batch's lease row, before any of its tasks; (batch, owner, halted at).

    Called inside the action's transaction: the lock timeout ends with it.
    """
    conn.execute(
        query("set_local_lock_timeout"), {"lock_timeout": OPERATOR_LOCK_TIMEOUT}
    )
    row = conn.execute(query("lock_batch"), {"batch_id": batch_id}).fetchone()
    if row is None:
        raise UnknownBatch(batch_id)
    return row


def _check_ids(ids: Sequence[int] | None) -> list[int] | None:
    if ids is None:
        return None
    checked = list(ids)
    for position, task_id in enumerate(checked):
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 1:
            raise InvalidInput(f"ids[{position}]", "must be a positive whole number")
    return checked


def _ids(cursor: psycopg.Cursor) -> list[int]:
    return [row[0] for row in cursor.fetchall()]
