"""How a batch is claimed and given back: the lease row in "BatchLocks".

A claim is one statement: it picks a batch whose head is ready, skipping lease rows that
other claimers hold (FOR NO KEY UPDATE SKIP LOCKED), takes or takes over its lease with
a new fencing token, and counts a start of the head in the same commit. It walks only
the batches marked "MaybePending" (an index), so its cost does not grow with idle
batches; a marked batch found empty has its marker cleared by the claimer that met it.
"""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import psycopg
from psycopg import pq

from queue_core.models import Lease
from queue_core.queries import query

log = logging.getLogger(__name__)

# A claim that meets a held head or an empty batch tries the next, a bounded number of
# times.
MAX_BUSY_BATCHES = 8

# Clearing a marker is correct only with a new snapshot per statement (see the
# migration that adds it), whatever the server's default isolation level.
BEGIN_READ_COMMITTED = "BEGIN ISOLATION LEVEL READ COMMITTED"


class ClaimResult:
    """A lease, or None and the ready batches whose head was held elsewhere."""

    __slots__ = ("busy_batch_ids", "lease")

    def __init__(self, lease: Lease | None, busy_batch_ids: Sequence[str]) -> None:
        self.lease = lease
        self.busy_batch_ids = list(busy_batch_ids)


def claim_batch(
    conn: psycopg.Connection,
    worker_id: str,
    lease_seconds: float,
    preferred_batch_id: str | None = None,
) -> ClaimResult:
    busy: list[str] = []
    skipped: list[str] = []
    while len(skipped) < MAX_BUSY_BATCHES:
        row = conn.execute(
            query("claim_batch"),
            {
                "worker_id": worker_id,
                "lease_seconds": lease_seconds,
                "preferred_batch_id": preferred_batch_id,
                "busy_batch_ids": skipped,
            },
        ).fetchone()
        if row is None:
            return ClaimResult(None, busy)

        batch_id, previous_owner, fencing_token, has_head = row
        skipped.append(batch_id)
        if not has_head:
            _clear_stale_marker(conn, batch_id, worker_id)
            continue
        if fencing_token is None:
            log.info(
                "batch head held by another transaction, not claimed",
                extra={
                    "action": "claim_busy",
                    "batch_id": batch_id,
                    "worker_id": worker_id,
                },
            )
            busy.append(batch_id)
            continue

        lease = Lease(
            batch_id, worker_id, fencing_token, taken_over_from=previous_owner
        )
        _log_claim(lease)
        return ClaimResult(lease, busy)
    return ClaimResult(None, busy)


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
        extra=_fields(lease, "lease_released" if row else "lease_lost"),
    )
    return row is not None


def _clear_stale_marker(
    conn: psycopg.Connection, batch_id: str, worker_id: str
) -> None:
    """A claim met a batch marked as maybe pending that has no task: clear the mark."""
    with _short_transaction(conn):
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
def _short_transaction(conn: psycopg.Connection) -> Iterator[None]:
    """BEGIN, the statements of the block, COMMIT: one pipeline, one round trip."""
    try:
        with conn.pipeline():
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
                **_fields(lease, "lease_taken_over"),
                "previous_owner": lease.taken_over_from,
            },
        )
    else:
        log.info("lease claimed", extra=_fields(lease, "lease_claimed"))


def _fields(lease: Lease, action: str) -> dict[str, object]:
    return {
        "action": action,
        "batch_id": lease.batch_id,
        "worker_id": lease.worker_id,
        "lease_token": lease.fencing_token,
    }
