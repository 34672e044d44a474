"""Working a batch: claim its lease, then take, process and delete its head, in order.

Each task is one transaction: lock the head, run the processor, delete the head. The
delete, its COMMIT, and the BEGIN and head lock of the next task travel in one pipeline,
so a task costs about one round trip and one commit. Every write is fenced by the
lease's token.

A failed task stays at the head with a not-before time and the lease is given back.
Once a task has used up its attempts the batch's policy applies, in the statement that
records the failure, or, when its last start ended without an outcome (the worker
died), in the claim that finds it so.
"""

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import psycopg
from psycopg import pq

from queue_core.config import Settings
from queue_core.db import (
    ConnectionHolder,
    is_transient,
    retrying,
    transaction_bounds,
)
from queue_core.lease import claim_batch, clear_marker, release
from queue_core.models import CompletedTask, Lease, Outcome, Task, WorkReport
from queue_core.processor import Processor, load_processor
from queue_core.queries import query

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


class _HeadBusy:
    """The head of the batch is locked by another transaction."""


class _HeadNotStarted:
    """The head's start was not counted under this lease: it must be claimed afresh."""


HEAD_BUSY = _HeadBusy()
HEAD_NOT_STARTED = _HeadNotStarted()

Head = Task | _HeadBusy | _HeadNotStarted | None

# record_failure's outcome, as the worker reports it.
_FAILURE_OUTCOMES = {
    "retry": Outcome.TASK_FAILED,
    "gone": Outcome.TASK_FAILED,
    "dead_lettered": Outcome.DEAD_LETTERED,
    "halted": Outcome.BATCH_HALTED,
}


class _Completion(NamedTuple):
    lease_held: bool
    continuing: bool
    more_pending: bool
    next_head: Head


class Worker:
    def __init__(
        self,
        connections: ConnectionHolder,
        settings: Settings,
        processor: Processor | None = None,
        step_span: Callable[[str], AbstractContextManager] = lambda _name: (
            nullcontext()
        ),
    ) -> None:
        """step_span(name) wraps each database step, for tracing."""
        self._connections = connections
        self._settings = settings
        self._processor = processor
        self._span = step_span

    def run(
        self,
        worker_id: str,
        preferred_batch_id: str | None = None,
        time_left: Callable[[], float] = lambda: math.inf,
    ) -> WorkReport:
        """Claim one batch; work it until it drains, time runs short or a task fails."""
        report = WorkReport(worker_id)
        if not self._time_for_a_task(time_left):
            report.outcome = Outcome.TIME_UP
            return report
        processor = self._processor or load_processor(self._settings.task_processor)

        with self._span("claim_batch"):
            claim = self._retrying(
                lambda: claim_batch(
                    self._connections.get(),
                    worker_id,
                    self._settings.lease_seconds,
                    preferred_batch_id,
                    max_attempts=self._settings.max_attempts,
                    on_exhausted=self._settings.on_exhausted,
                )
            )
        report.dead_lettered.extend(claim.dead_lettered)
        report.halted_batch_ids.extend(claim.halted_batch_ids)
        if claim.lease is None:
            report.outcome = (
                Outcome.BATCH_BUSY if claim.busy_batch_ids else Outcome.NO_WORK
            )
            log.debug(
                "nothing to claim",
                extra={"action": report.outcome, "worker_id": worker_id},
            )
            return report

        lease = claim.lease
        report.batch_id = lease.batch_id
        report.fencing_token = lease.fencing_token
        report.taken_over_from = lease.taken_over_from
        try:
            self._work_batch(lease, processor, report, time_left)
        except psycopg.Error as error:
            if not is_transient(error):
                self._connections.discard()
                raise
            self._stop_after_database_error(lease, report, error)
        except BaseException:
            # Closing the connection rolls back the task in flight; the lease expires.
            self._connections.discard()
            raise
        return report

    def run_batches(
        self,
        worker_id: str,
        preferred_batch_id: str | None = None,
        time_left: Callable[[], float] = lambda: math.inf,
        max_batches: int = 1,
    ) -> list[WorkReport]:
        """Like run(), then claim the next batch each time one drains, while time
        allows, up to max_batches batches."""
        reports = [self.run(worker_id, preferred_batch_id, time_left)]
        while (
            len(reports) < max_batches
            and reports[-1].outcome == Outcome.DRAINED
            and self._time_for_a_task(time_left)
        ):
            reports.append(self.run(worker_id, None, time_left))
        return reports

    def _work_batch(
        self,
        lease: Lease,
        processor: Processor,
        report: WorkReport,
        time_left: Callable[[], float],
    ) -> None:
        conn = self._connections.get()
        lease_params = _lease_params(lease, self._settings)
        with self._span("lock_head"):
            head = self._begin_and_lock_head(conn, lease, lease_params)
        while True:
            if not isinstance(head, Task):
                self._hand_back(conn, lease, head, report)
                return

            task = head
            started = time.monotonic()
            started_at = datetime.now(UTC)
            try:
                processor(task)
            except Exception as error:
                # The transaction holds only the head's lock: the processor's work is
                # its own, and the start was counted in an earlier commit.
                try:
                    self._end_transaction(conn)
                except psycopg.Error:
                    # The session died meanwhile (and its lock with it): the failure
                    # is still recorded, on a new one, if the lease holds.
                    self._connections.discard()
                self._record_failure(lease, task, error, report)
                return
            duration_ms = (time.monotonic() - started) * 1000

            keep_lease = self._time_for_a_task(time_left)
            with self._span("complete_task"):
                completion = self._complete(conn, lease, lease_params, task, keep_lease)
            if not completion.lease_held:
                self._end_transaction(conn)
                report.outcome = Outcome.LEASE_LOST
                log.warning(
                    "lease lost, task left pending",
                    extra={**lease.log_fields(task_id=task.id), "action": "lease_lost"},
                )
                return

            self._log_completion(lease, task, duration_ms, started_at)
            report.completed.append(
                CompletedTask(task.id, task.batch_id, task.attempt, duration_ms)
            )
            if not keep_lease:
                report.outcome = Outcome.TIME_UP
                return
            if not completion.continuing:
                # complete_task gave the lease back: the batch is empty, or its next
                # head may not start yet (its retry time, its attempts used up).
                report.outcome = (
                    Outcome.HEAD_WAITING if completion.more_pending else Outcome.DRAINED
                )
                _log_release(lease, report.outcome)
                if completion.more_pending:
                    self._end_transaction(conn)
                else:
                    # One round trip: end the empty transaction, clear the marker.
                    clear_marker(
                        conn, lease.batch_id, lease.worker_id, end_open_transaction=True
                    )
                return
            head = completion.next_head

    def _begin_and_lock_head(
        self, conn: psycopg.Connection, lease: Lease, lease_params: dict
    ) -> Head:
        with conn.pipeline():
            self._begin(conn)
            locked = conn.execute(query("lock_head"), lease_params)
        return _head_from_row(lease, locked.fetchone())

    def _begin(self, conn: psycopg.Connection) -> None:
        """BEGIN, bounded here when the session could not be (inside a pipeline)."""
        conn.execute("BEGIN")
        if not self._settings.session_options:
            conn.execute(query("bound_transaction"), transaction_bounds(self._settings))

    def _hand_back(
        self, conn: psycopg.Connection, lease: Lease, head: Head, report: WorkReport
    ) -> None:
        """No task to start under this lease: end the transaction, release the lease."""
        self._end_transaction(conn)
        still_held = self._retrying(
            lambda: release(self._connections.get(), lease, found_empty=head is None)
        )
        if head is HEAD_BUSY:
            report.outcome = Outcome.BATCH_BUSY
        elif head is HEAD_NOT_STARTED:
            report.outcome = Outcome.HEAD_WAITING
        else:
            report.outcome = Outcome.DRAINED if still_held else Outcome.LEASE_LOST

    def _complete(
        self,
        conn: psycopg.Connection,
        lease: Lease,
        lease_params: dict,
        task: Task,
        keep_lease: bool,
    ) -> _Completion:
        """Delete the task and commit; if keeping the lease, lock the next head.

        One pipeline: a single round trip to the server.
        """
        params = {**lease_params, "task_id": task.id, "keep_lease": keep_lease}
        next_head = None
        with conn.pipeline():
            done = conn.execute(query("complete_task"), params)
            conn.execute("COMMIT")
            if keep_lease:
                self._begin(conn)
                next_head = conn.execute(query("lock_head"), lease_params)
        lease_held, deleted, continuing, more_pending = done.fetchone()
        if not lease_held:
            return _Completion(False, False, False, None)
        if not deleted:
            # The lease held, so nobody else could delete it: the row was already gone.
            log.warning(
                "completed task was already deleted",
                extra=lease.log_fields(task_id=task.id),
            )
        head = None
        if next_head is not None:
            head = _head_from_row(lease, next_head.fetchone())
        return _Completion(True, continuing, more_pending, head)

    def _record_failure(
        self, lease: Lease, task: Task, error: Exception, report: WorkReport
    ) -> None:
        delay = self._retry_delay(task.attempt)
        message = clean_error(error)
        params = {
            **_lease_params(lease, self._settings),
            "task_id": task.id,
            "error": message,
            "retry_delay_seconds": delay,
        }
        with self._span("record_failure"):
            recorded = self._retrying(
                lambda: (
                    self._connections.get()
                    .execute(query("record_failure"), params)
                    .fetchone()
                )
            )
        outcome = recorded[1] if recorded else None
        report.outcome = _FAILURE_OUTCOMES.get(outcome, Outcome.LEASE_LOST)
        report.failed_task_id = task.id
        report.error = message

        fields = {
            **lease.log_fields(task_id=task.id),
            "attempt": task.attempt,
            "error": message,
        }
        if outcome == "dead_lettered":
            report.dead_lettered.append(task.id)
            log.warning(
                "task dead-lettered: its last allowed attempt failed",
                extra={**fields, "action": "task_dead_lettered"},
            )
        elif outcome == "halted":
            report.halted_batch_ids.append(lease.batch_id)
            log.error(
                "batch halted: its head failed its last allowed attempt",
                extra={**fields, "action": "batch_halted"},
            )
        else:
            log.warning(
                "task failed, kept at the head of its batch",
                extra={
                    **fields,
                    "action": "task_failed" if recorded else "lease_lost",
                    "retry_in_seconds": round(delay, 3),
                },
            )

    def _stop_after_database_error(
        self, lease: Lease, report: WorkReport, error: psycopg.Error
    ) -> None:
        """The transaction in flight is gone: give the lease back, let others go on."""
        log.warning(
            "database error while working a batch; stopping",
            extra={
                **lease.log_fields(),
                "action": "db_error",
                "error_class": type(error).__name__,
            },
        )
        report.outcome = Outcome.DATABASE_ERROR
        report.error = type(error).__name__
        self._connections.discard()
        try:
            self._retrying(lambda: release(self._connections.get(), lease))
        except Exception:
            log.warning("could not release the lease; it will expire", exc_info=True)

    def _end_transaction(self, conn: psycopg.Connection) -> None:
        """End a transaction that wrote nothing (it may hold the head's row lock)
        with COMMIT: the same effect as a ROLLBACK here, but psycopg drops every
        prepared statement on a ROLLBACK (and sends DEALLOCATE ALL), which would
        re-plan each statement once per batch."""
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.execute("COMMIT")

    def _retry_delay(self, attempt: int) -> float:
        base = self._settings.retry_base_seconds * 2 ** max(attempt - 1, 0)
        capped = min(self._settings.retry_max_seconds, base)
        return capped * random.uniform(0.5, 1.0)

    def _time_for_a_task(self, time_left: Callable[[], float]) -> bool:
        needed = (
            self._settings.task_budget_seconds + self._settings.safety_margin_seconds
        )
        return time_left() > needed

    def _retrying(self, step):
        return retrying(
            step, on_retry=lambda _error: self._connections.discard_if_broken()
        )

    def _log_completion(
        self, lease: Lease, task: Task, duration_ms: float, started_at: datetime
    ) -> None:
        if not log.isEnabledFor(logging.INFO):
            return  # the audit line is off: skip building it
        log.info(
            "task completed",
            extra={
                **lease.log_fields(task_id=task.id),
                "action": "task_completed",
                "attempt": task.attempt,
                "duration_ms": round(duration_ms, 3),
                "started_at": started_at.isoformat(),
                # The processor's end, before the commit; completed_at follows it.
                "finished_at": (
                    started_at + timedelta(milliseconds=duration_ms)
                ).isoformat(),
                "completed_at": datetime.now(UTC).isoformat(),
            },
        )


def clean_error(error: BaseException) -> str:
    """Error text that can always be stored: no NUL, valid UTF-8, bounded length."""
    try:
        detail = str(error)
    except Exception:  # an exception whose __str__ fails must still be recorded
        detail = "<error text unavailable>"
    text = f"{type(error).__name__}: {detail}".replace("\x00", "")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:MAX_ERROR_CHARS]


def _head_from_row(lease: Lease, row) -> Head:
    if row is None:
        return None
    head_id, task_id, payload, attempts, enqueued_at, started = row
    if task_id is None:
        log.info(
            "head held by another transaction",
            extra={**lease.log_fields(), "action": "head_busy", "task_id": head_id},
        )
        return HEAD_BUSY
    if not started:
        log.info(
            "head not started under this lease; handing the batch back",
            extra={
                **lease.log_fields(),
                "action": "head_not_started",
                "task_id": head_id,
            },
        )
        return HEAD_NOT_STARTED
    return Task(
        task_id, lease.batch_id, payload, attempts, enqueued_at, lease.fencing_token
    )


def _log_release(lease: Lease, outcome: Outcome) -> None:
    log.info(
        "lease released",
        extra={**lease.log_fields(), "action": "lease_released", "reason": outcome},
    )


def _lease_params(lease: Lease, settings: Settings) -> dict[str, object]:
    return {
        "batch_id": lease.batch_id,
        "fencing_token": lease.fencing_token,
        "lease_seconds": settings.lease_seconds,
        "max_attempts": settings.max_attempts,
        "on_exhausted": settings.on_exhausted,
    }
