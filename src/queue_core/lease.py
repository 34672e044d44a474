"""How a batch is claimed and given back: the lease row in "BatchLocks".

A claim is one statement: it picks a batch whose head is ready, skipping lease rows that
other claimers hold (FOR NO KEY UPDATE SKIP LOCKED), takes or takes over its lease with
a new fencing token, and counts a start of the head in the same commit.
"""

import logging
from collections.abc import Sequence

import psycopg

from queue_core.models import Lease
from queue_core.queries import query

log = logging.getLogger(__name__)

# A claim that meets a held head tries the next batch, a bounded number of times.
MAX_BUSY_BATCHES = 8


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
    while len(busy) < MAX_BUSY_BATCHES:
        row = conn.execute(
            query("claim_batch"),
            {
                "worker_id": worker_id,
                "lease_seconds": lease_seconds,
                "preferred_batch_id": preferred_batch_id,
                "busy_batch_ids": busy,
            },
        ).fetchone()
        if row is None:
            return ClaimResult(None, busy)

        batch_id, previous_owner, fencing_token = row
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


def release(conn: psycopg.Connection, lease: Lease) -> bool:
    """Give the lease back; False when it was no longer this worker's."""
    row = conn.execute(
        query("release_lease"),
        {"batch_id": lease.batch_id, "fencing_token": lease.fencing_token},
    ).fetchone()
    log.info(
        "lease released" if row else "lease already lost at release",
        extra=_fields(lease, "lease_released" if row else "lease_lost"),
    )
    return row is not None


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
