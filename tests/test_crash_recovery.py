"""A worker that dies or freezes mid-task: its task is kept, and redone exactly once."""

import collections
import os
import signal

import psycopg
import pytest

from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many
from tests.support import db
from tests.support.processors import read_records, record

LEASE_SECONDS = 2


@pytest.mark.slow
def test_task_of_a_killed_worker_is_redone_first_by_the_next_owner(
    conn, worker_processes, records_file
):
    # GIVEN batch B with three tasks and batch A with two
    b_ids = enqueue_many(conn, [("B", {"n": n}) for n in range(3)])
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(2)])

    # AND a worker process, with a short lease, in the middle of B's head
    victim = worker_processes.start(
        "--events",
        "schedule-input-batch-b",
        env={"LEASE_TIMEOUT_SECONDS": str(LEASE_SECONDS), "RECORD_SLEEP_SECONDS": "60"},
    )
    started = db.wait_until(
        lambda: _starts_of(records_file, pid=victim.pid),
        timeout=60,
        what="the victim to start a task",
    )
    assert [record["task_id"] for record in started] == [b_ids[0]]
    victim_id = db.lease(conn, "B")["LockedBy"]

    # WHEN it is killed with SIGKILL
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    # THEN its task stays in "Tasks", its start counted, nothing of B deleted
    assert db.pending_ids(conn, "B") == b_ids
    assert db.task(conn, b_ids[0])["Attempts"] == 1

    # WHEN another worker works the queue until it is empty
    survivor = worker_processes.start(
        "--events",
        "schedule-input-batch-b,schedule-default",
        "--until-empty",
        env={"LEASE_TIMEOUT_SECONDS": str(LEASE_SECONDS)},
    )
    assert worker_processes.wait(survivor, timeout=60) == 0, worker_processes.output(
        survivor
    )

    # THEN it took B over from the victim once the lease expired
    reports = read_records(worker_processes.reports_file)
    assert all(report["pid"] == survivor.pid for report in reports)
    takeovers = [report for report in reports if report["takenOverFrom"]]
    assert [(r["batchId"], r["takenOverFrom"]) for r in takeovers] == [("B", victim_id)]

    # AND the first task it processed in B was the victim's task, as attempt 2
    survivor_starts = _starts_of(records_file, pid=survivor.pid)
    first_in_b = next(record for record in survivor_starts if record["batch_id"] == "B")
    assert (first_in_b["task_id"], first_in_b["attempt"]) == (b_ids[0], 2)

    # AND every other task was processed exactly once, on its first attempt, in order
    starts = collections.Counter(record["task_id"] for record in survivor_starts)
    assert starts == collections.Counter(b_ids + a_ids)
    assert [r["task_id"] for r in survivor_starts if r["batch_id"] == "B"] == b_ids
    assert all(r["attempt"] == 1 for r in survivor_starts if r["task_id"] != b_ids[0])

    # AND everything was completed, once
    completed = [task_id for report in reports for task_id in report["completed"]]
    assert sorted(completed) == sorted(b_ids + a_ids)
    assert db.pending_ids(conn) == []


@pytest.mark.slow
def test_frozen_worker_cannot_complete_after_its_lease_expired(
    conn, db_url, worker_processes, records_file
):
    # GIVEN batch B with two tasks
    b_ids = enqueue_many(conn, [("B", {"n": 0}), ("B", {"n": 1})])

    # AND a worker process frozen with SIGSTOP in the middle of B's head
    frozen = worker_processes.start(
        "--events",
        "schedule-input-batch-b",
        env={
            "LEASE_TIMEOUT_SECONDS": "1",
            "RECORD_SLEEP_SECONDS": "2",
            # Longer than the test: here the frozen worker must keep its row lock.
            "TRANSACTION_TIMEOUT_SECONDS": "120",
        },
    )
    db.wait_until(
        lambda: _starts_of(records_file, pid=frozen.pid),
        timeout=60,
        what="the worker to start B's head",
    )
    frozen.send_signal(signal.SIGSTOP)
    frozen_id = db.lease(conn, "B")["LockedBy"]

    # AND its lease has expired
    db.wait_until(
        lambda: db.lease_expired(conn, "B", 1), timeout=30, what="the lease to expire"
    )

    # WHEN a second worker runs while the frozen one still holds the head's row lock
    holder = ConnectionHolder(db_url)
    second = Worker(holder, db.settings(db_url, LEASE_TIMEOUT_SECONDS=1), record)
    backed_off = second.run("second-worker", preferred_batch_id="B")

    # THEN it backs off instead of running the next task
    assert backed_off.outcome == Outcome.BATCH_BUSY
    assert backed_off.completed == []
    assert _starts_of(records_file, pid=os.getpid()) == []
    assert db.task(conn, b_ids[1])["Attempts"] == 0

    # WHEN the frozen worker wakes up, finishes its task and tries to complete it
    frozen.send_signal(signal.SIGCONT)
    assert worker_processes.wait(frozen, timeout=60) == 0

    # THEN it could not: the lease was lost and nothing was deleted
    (frozen_report,) = read_records(worker_processes.reports_file)
    assert frozen_report["outcome"] == "lease_lost"
    assert frozen_report["completed"] == []
    assert db.pending_ids(conn, "B") == b_ids

    # WHEN the second worker runs again
    report = second.run("second-worker", preferred_batch_id="B")

    # THEN it takes the batch over and redoes the head as attempt 2, then the next task
    assert report.outcome == Outcome.DRAINED
    assert report.taken_over_from == frozen_id
    assert [(t.task_id, t.attempt) for t in report.completed] == [
        (b_ids[0], 2),
        (b_ids[1], 1),
    ]
    starts = read_records(records_file)
    assert [(r["task_id"], r["attempt"]) for r in starts if r["event"] == "start"] == [
        (b_ids[0], 1),
        (b_ids[0], 2),
        (b_ids[1], 1),
    ]
    assert db.pending_ids(conn) == []
    holder.discard()


def _starts_of(records_file, pid: int) -> list[dict]:
    return [
        record
        for record in read_records(records_file)
        if record["event"] == "start" and record["pid"] == pid
    ]


def test_connection_closed_by_the_server_mid_task_leaves_the_task_for_one_redo(
    conn, db_url
):
    # GIVEN batch A with two tasks
    ids = enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])

    # AND a processor during whose first task the server ends the worker's session
    holder = ConnectionHolder(db_url)
    seen: list[tuple[int, int]] = []

    def processor(task):
        seen.append((task.id, task.attempt))
        if len(seen) == 1:
            conn.execute(
                "SELECT pg_terminate_backend(%s)", (holder.get().info.backend_pid,)
            )

    worker = Worker(holder, db.settings(db_url), processor)

    # WHEN the worker runs
    report = worker.run("worker-1")

    # THEN it stops with a database error and the lease given back, the task kept with
    # its start counted
    assert report.outcome == Outcome.DATABASE_ERROR
    assert report.error
    assert report.completed == []
    assert db.pending_ids(conn, "A") == ids
    assert db.task(conn, ids[0])["Attempts"] == 1
    assert db.lease(conn, "A")["LockedBy"] is None

    # WHEN it runs again, on a new connection
    report = worker.run("worker-1")

    # THEN the task is redone once, as attempt 2, and the batch finishes in order
    assert report.outcome == Outcome.DRAINED
    assert seen == [(ids[0], 1), (ids[0], 2), (ids[1], 1)]
    assert db.pending_ids(conn) == []
    assert holder.connects == 2
    holder.discard()


def test_a_killed_session_does_not_break_the_next_worker(conn, db_url):
    # GIVEN a worker whose warm connection the server has ended while it was idle
    enqueue_many(conn, [("A", {"n": 0})])
    holder = ConnectionHolder(db_url)
    pid = holder.get().info.backend_pid
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    db.wait_until(
        lambda: (
            not conn.execute(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", (pid,)
            ).fetchone()[0]
        ),
        timeout=10,
        what="the session to end",
    )

    # WHEN the worker runs
    report = Worker(holder, db.settings(db_url), lambda _task: None).run("worker-1")

    # THEN the claim is retried on a new connection and the work done
    assert report.outcome == Outcome.DRAINED
    assert len(report.completed) == 1
    assert holder.get().info.backend_pid != pid
    assert isinstance(holder.get(), psycopg.Connection)
    holder.discard()


class Abort(BaseException):
    """Escapes `except Exception`, as a timeout signal or SystemExit would."""


def test_processor_escaping_with_a_base_exception_leaves_no_half_open_transaction(
    conn, db_url
):
    # GIVEN batch A with two tasks, and a processor that aborts on the first attempt
    ids = enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])
    seen: list[tuple[int, int]] = []

    def processor(task):
        seen.append((task.id, task.attempt))
        if task.attempt == 1 and task.id == ids[0]:
            raise Abort

    holder = ConnectionHolder(db_url)
    worker = Worker(holder, db.settings(db_url, LEASE_TIMEOUT_SECONDS=0.5), processor)

    # WHEN a worker runs and the abort escapes it
    with pytest.raises(Abort):
        worker.run("worker-1")

    # THEN the task in flight was rolled back, not deleted, its start counted
    assert db.pending_ids(conn) == ids
    assert db.task(conn, ids[0])["Attempts"] == 1

    # WHEN the same warm worker runs again once the lease has expired
    db.wait_until(
        lambda: db.lease_expired(conn, "A", 0.5), timeout=10, what="the lease to expire"
    )
    report = worker.run("worker-2")

    # THEN it works on a sound connection: the head again as attempt 2, then the next
    assert report.outcome == Outcome.DRAINED
    assert report.taken_over_from == "worker-1"
    assert seen == [(ids[0], 1), (ids[0], 2), (ids[1], 1)]
    assert db.pending_ids(conn) == []
    holder.discard()
