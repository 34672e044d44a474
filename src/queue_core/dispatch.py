"""What the scheduled tick does: learn, in one query, how much work can be claimed now
and how many leases are held, and decide how many workers to start.

The decision only; starting workers is the caller's business (the Lambda edge invokes
its own function asynchronously), so this module knows nothing of Lambda.
"""

import logging
from dataclasses import dataclass

import psycopg

from queue_core.queries import query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchPlan:
    """Both counts stop at max_concurrency, which keeps the query short."""

    claimable: int
    held: int
    max_concurrency: int
    pending: int = 0
    oldest_pending_seconds: float = 0.0

    @property
    def work_here(self) -> bool:
        """The tick works one batch itself: it is running already, an invoke is not."""
        return self.claimable > 0 and self.held < self.max_concurrency

    @property
    def start_others(self) -> int:
        """Workers to start besides the tick itself, never past max_concurrency."""
        if not self.work_here:
            return 0
        free_slots = self.max_concurrency - self.held - 1
        return max(0, min(self.claimable - 1, free_slots))

    def as_dict(self) -> dict[str, int | bool]:
        return {
            "claimable": self.claimable,
            "held": self.held,
            "maxConcurrency": self.max_concurrency,
            "workHere": self.work_here,
            "startOthers": self.start_others,
            "pending": self.pending,
            "oldestPendingSeconds": round(self.oldest_pending_seconds, 3),
        }


def plan_dispatch(
    conn: psycopg.Connection, lease_seconds: float, max_concurrency: int
) -> DispatchPlan:
    """One statement, on an autocommit connection: no transaction is left open."""
    claimable, held, pending, oldest = conn.execute(
        query("dispatch_status"),
        {"lease_seconds": lease_seconds, "limit": max_concurrency},
    ).fetchone()
    plan = DispatchPlan(claimable, held, max_concurrency, pending, float(oldest))
    log.debug(
        "dispatch planned", extra={"action": "dispatch_planned", **plan.as_dict()}
    )
    return plan
