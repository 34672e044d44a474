"""What an operator does to batches and dead letters, safe while workers run.

Each action on a batch is one short transaction that locks the batch's lease row first
and, after that, never waits for a task row: a task a worker holds is skipped and
reported (SKIP LOCKED). That keeps every lock wait one-way: a worker in a task holds
its head row and may wait for the lease row (to complete the task); a claim takes a
lease row and a head row but never waits for either; an operator holds the lease row
and waits for no task. No cycle, so no deadlock.

Actions that take work away from an owner (releasing its lease) raise the fencing token,
so the former owner's later writes change nothing; its task in flight stays pending.
Nothing is deleted without a trace except by purge_dead_letters: cancelling a batch
moves its tasks to the dead letters, from where they can be redriven.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from queue_core.config import EXHAUSTION_POLICIES
from queue_core.errors import InvalidInput, UnknownBatch
from queue_core.queries import query
from queue_core.validation import check_batch_id

log = logging.getLogger(__name__)

MAX_ATTEMPTS_LIMIT = 1000
# Tells set_batch_policy to leave a setting as it is.
UNCHANGED: Any = object()


@dataclass(frozen=True)
class BatchView:
    """A batch as an operator sees it."""

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "batchId": self.batch_id,
            "owner": self.owner,
            "fencingToken": self.fencing_token,
            "leaseLive": self.lease_live,
            "leaseExpiresAt": _iso(self.lease_expires_at),
            "maxAttempts": self.max_attempts,
            "onExhausted": self.on_exhausted,
            "halted": self.halted_at is not None,
            "haltedAt": _iso(self.halted_at),
            "haltReason": self.halt_reason,
            "pending": self.pending,
            "headId": self.head_id,
            "headAttempts": self.head_attempts,
            "headNotBefore": _iso(self.head_not_before),
            "headLastError": self.head_last_error,
            "deadLetters": self.dead_letters,
        }


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "batchId": self.batch_id,
            "payload": self.payload,
            "enqueuedAt": _iso(self.enqueued_at),
            "attempts": self.attempts,
            "lastError": self.last_error,
            "firstFailedAt": _iso(self.first_failed_at),
            "lastFailedAt": _iso(self.last_failed_at),
            "deadLetteredAt": _iso(self.dead_lettered_at),
            "reason": self.reason,
        }


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


def list_batches(
    conn: psycopg.Connection, lease_seconds: float, batch_id: str | None = None
) -> list[BatchView]:
    if batch_id is not None:
        check_batch_id(batch_id)
    rows = conn.execute(
        query("list_batches"), {"lease_seconds": lease_seconds, "batch_id": batch_id}
    ).fetchall()
    return [BatchView(*row) for row in rows]


def release_lease(conn: psycopg.Connection, batch_id: str) -> str | None:
    """Take the batch's lease from its owner; returns the owner, None if it had none."""
    check_batch_id(batch_id)
    with conn.transaction():
        owner = _lock_batch(conn, batch_id)[1]
        if owner is None:
            return None
        token = conn.execute(query("revoke_lease"), {"batch_id": batch_id}).fetchone()
    log.info(
        "lease released by an operator",
        extra={
            "action": "lease_revoked",
            "batch_id": batch_id,
            "previous_owner": owner,
            "lease_token": token[0],
        },
    )
    return owner


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


def list_dead_letters(
    conn: psycopg.Connection, batch_id: str | None = None, limit: int = 1000
) -> list[DeadLetter]:
    if batch_id is not None:
        check_batch_id(batch_id)
    rows = conn.execute(
        query("list_dead_letters"), {"batch_id": batch_id, "limit": limit}
    ).fetchall()
    return [DeadLetter(*row) for row in rows]


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


def _lock_batch(conn: psycopg.Connection, batch_id: str) -> tuple:
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


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
