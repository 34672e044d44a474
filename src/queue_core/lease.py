"""How a batch is claimed and given back: the lease row in "BatchLocks".

A claim is one statement: it picks a batch whose head is ready, skipping lease rows that
other claimers hold (FOR NO KEY UPDATE SKIP LOCKED), takes or takes over its lease with
a new fencing token, and counts a start of the head in the same commit. It walks only
the batches marked "MaybePending" (an index), so its cost does not grow with idle
batches; a marked batch found empty has its marker cleared by the claimer that met it.
When the head has used up its attempts (its starts were cut short: the worker died,
froze or lost its lease), the same statement applies the batch's policy instead, and
the claim moves on.
"""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import psycopg
from psycopg import pq

from queue_core.config import DEAD_LETTER
from queue_core.models import Lease
from queue_core.queries import query

log = logging.getLogger(__name__)

# A claim that meets a held head or an empty batch, or applies a policy, tries again,
# a bounded number of times.
MAX_BUSY_BATCHES = 16
MAX_CLAIM_ROUNDS = 24

# Clearing a marker is correct only with a new snapshot per statement (see the
# migration that adds it), whatever the server's default isolation level.
BEGIN_READ_COMMITTED = "BEGIN ISOLATION LEVEL READ COMMITTED"


class ClaimResult:
    """A lease, or None and the ready batches whose head was held elsewhere.

    dead_lettered and halted_batch_ids tell what the claim did to heads whose attempts
    were used up, on its way to a lease.
    """

    __slots__ = ("busy_batch_ids", "dead_lettered", "halted_batch_ids", "lease")

    def __init__(
        self,
        lease: Lease | None,
        busy_batch_ids: Sequence[str],
        dead_lettered: Sequence[int] = (),
        halted_batch_ids: Sequence[str] = (),
    ) -> None:
        self.lease = lease
        self.busy_batch_ids = list(busy_batch_ids)
        self.dead_lettered = list(dead_lettered)
        self.halted_batch_ids = list(halted_batch_ids)


def claim_batch(
    conn: psycopg.Connection,
    worker_id: str,
    lease_seconds: float,
    preferred_batch_id: str | None = None,
    *,
    max_attempts: int = 5,
    on_exhausted: str = DEAD_LETTER,
) -> ClaimResult:
    busy: list[str] = []
    skipped: list[str] = []
    dead_lettered: list[int] = []
    halted: list[str] = []
    for _round in range(MAX_CLAIM_ROUNDS):
        if len(skipped) >= MAX_BUSY_BATCHES:
            break
        row = conn.execute(
            query("claim_batch"),
            {
                "worker_id": worker_id,
                "lease_seconds": lease_seconds,
                "preferred_batch_id": preferred_batch_id,
                "busy_batch_ids": skipped,
                "max_attempts": max_attempts,
                "on_exhausted": on_exhausted,
            },
        ).fetchone()
        if row is None:
            break

        batch_id, previous_owner, outcome, token, head_id, attempts, limit = row[:7]
        has_head = row[7]
        if not has_head:
            skipped.append(batch_id)
            clear_marker(conn, batch_id, worker_id)
            continue
        if outcome == "busy":
            skipped.append(batch_id)
            busy.append(batch_id)
            log.info(
                "batch head held by another transaction, not claimed",
                extra={
                    "action": "claim_busy",
                    "batch_id": batch_id,
                    "worker_id": worker_id,
                },
            )
            continue
        if outcome != "claimed":
            _log_exhausted(outcome, batch_id, head_id, attempts, limit, worker_id)
            if outcome == "dead_lettered":
                dead_lettered.append(head_id)
            else:
                halted.append(batch_id)
            continue

        lease = Lease(batch_id, worker_id, token, taken_over_from=previous_owner)
        _log_claim(lease)
        return ClaimResult(lease, busy, dead_lettered, halted)
    return ClaimResult(None, busy, dead_lettered, halted)


def _log_exhausted(
    outcome: str,
    batch_id: str,
    task_id: int,
    attempts: int,
    max_attempts: int,
    worker_id: str,
) -> None:
    fields = {
        "batch_id": batch_id,
        "task_id": task_id,
        "worker_id": worker_id,
        "attempts": attempts,
        "max_attempts": max_attempts,
        "last_attempt": "no outcome recorded (worker died, froze or lost its lease)",
    }
    if outcome == "dead_lettered":
        log.warning(
            "task dead-lettered: attempts used up",
            extra={**fields, "action": "task_dead_lettered"},
        )
    else:
        log.error(
            "batch halted: its head used up its attempts",
            extra={**fields, "action": "batch_halted"},
        )


def release(
    conn: psycopg.Connection, lease: Lease, *, found_empty: bool = False
) -> bool:
    """Give the lease back; False when it was no longer this worker's.

    found_empty: the worker saw the batch empty, so its pending-work marker is cleared
    in the same transaction, unless a new task may be on its way. One round trip.
    """
    params = {"batch_id": lease.batch_id, "fencing_token": lease.fencing_token}
    if found_empty:
        with _short_transaction(conn):
            released = conn.execute(query("release_lease"), params)
            conn.execute(query("clear_marker"), params)
        row = released.fetchone()
    else:
        row = conn.execute(query("release_lease"), params).fetchone()
    log.info(
        "lease released" if row else "lease already lost at release",
        extra=lease.log_fields(action="lease_released" if row else "lease_lost"),
    )
    return row is not None


def clear_marker(
    conn: psycopg.Connection,
    batch_id: str,
    worker_id: str,
    *,
    end_open_transaction: bool = False,
) -> None:
    """A batch marked as maybe pending was found empty: clear the mark, unless a task
    may be on its way (an inserting transaction still open). One round trip.

    end_open_transaction: the caller's open transaction wrote nothing; COMMIT it in
    the same round trip first.
    """
    with _short_transaction(conn, end_open_transaction=end_open_transaction):
        cleared = conn.execute(query("clear_marker"), {"batch_id": batch_id})
    log.debug(
        "stale pending marker met",
        extra={
            "action": "marker_cleared" if cleared.fetchone()[0] else "marker_kept",
            "batch_id": batch_id,
            "worker_id": worker_id,
        },
    )


@contextmanager
def _short_transaction(
    conn: psycopg.Connection, *, end_open_transaction: bool = False
) -> Iterator[None]:
    """BEGIN, the statements of the block, COMMIT: one pipeline, one round trip."""
    try:
        with conn.pipeline():
            if end_open_transaction and conn.info.transaction_status in _OPEN:
                conn.execute("COMMIT")
            conn.execute(BEGIN_READ_COMMITTED)
            yield
            conn.execute("COMMIT")
    except BaseException:
        if conn.info.transaction_status in _OPEN:
            with suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise


_OPEN = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)


def _log_claim(lease: Lease) -> None:
    if lease.taken_over_from:
        log.info(
            "stale lease taken over",
            extra={
                **lease.log_fields(action="lease_taken_over"),
                "previous_owner": lease.taken_over_from,
            },
        )
    else:
        log.info("lease claimed", extra=lease.log_fields(action="lease_claimed"))
