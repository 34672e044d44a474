"""A batch whose head another transaction holds waits: its head is never skipped."""

import psycopg
import pytest

from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many
from queue_core.lease import claim_batch
from queue_core.queries import query
from tests.support import db


@pytest.fixture
def worker(db_url):
    processed: list[int] = []
    holder = ConnectionHolder(db_url)
    worker = Worker(holder, db.settings(db_url), lambda task: processed.append(task.id))
    worker.processed = processed
    yield worker
    holder.discard()


@pytest.mark.parametrize("lease_before", ["free", "expired"])
def test_worker_does_not_run_the_second_task_while_the_head_is_held(
    conn, db_url, worker, lease_before
):
    # GIVEN batch A with two tasks and batch B with one
    a_ids = enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])
    (b_id,) = enqueue_many(conn, [("B", {"n": 0})])

    # AND A's lease is free, or still names a former owner whose lease has expired
    if lease_before == "expired":
        conn.execute(
            """UPDATE "BatchLocks" SET "LockedBy" = 'frozen-worker',
                   "LockedAt" = now() - interval '1 hour', "FencingToken" = 7
               WHERE "BatchId" = 'A'"""
        )

    # AND another transaction holds A's head with SELECT ... FOR UPDATE
    with psycopg.connect(db_url) as holder:
        holder.execute('SELECT FROM "Tasks" WHERE "Id" = %s FOR UPDATE', (a_ids[0],))
        lease_of_a = db.lease(conn, "A")

        # WHEN a worker that prefers A runs
        first = worker.run("worker-1", preferred_batch_id="A")

        # THEN it works B instead, and B only
        assert first.batch_id == "B"
        assert first.outcome == Outcome.DRAINED
        assert worker.processed == [b_id]

        # WHEN a worker runs with only A left
        second = worker.run("worker-2")

        # THEN it backs off
        assert second.outcome == Outcome.BATCH_BUSY
        assert second.completed == []

        # AND A is untouched: both tasks pending, no start counted, its lease unchanged
        assert worker.processed == [b_id]
        assert db.pending_ids(conn, "A") == a_ids
        assert [db.task(conn, i)["Attempts"] for i in a_ids] == [0, 0]
        assert db.lease(conn, "A") == lease_of_a
        holder.rollback()

    # WHEN the holder is gone and a worker runs
    third = worker.run("worker-3")

    # THEN A is worked from its head, in order
    assert third.outcome == Outcome.DRAINED
    assert worker.processed == [b_id, *a_ids]
    if lease_before == "expired":
        assert third.taken_over_from == "frozen-worker"


def test_lock_head_reports_a_held_head_instead_of_the_next_task(conn, db_url):
    # GIVEN batch A with two tasks, claimed by worker-1
    ids = enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])
    lease = claim_batch(conn, "worker-1", 300).lease

    # AND another transaction that has taken the head since
    with psycopg.connect(db_url) as holder:
        holder.execute('SELECT FROM "Tasks" WHERE "Id" = %s FOR UPDATE', (ids[0],))

        # WHEN worker-1 locks its head
        params = {"batch_id": "A", "fencing_token": lease.fencing_token}
        row = conn.execute(query("lock_head"), {**params, "lease_seconds": 300})

        # THEN it learns the head is held, and is not handed the second task
        assert [r[:5] for r in row.fetchall()] == [(ids[0], None, None, None, None)]
        holder.rollback()


def test_failed_head_keeps_its_batch_waiting_while_other_batches_go_on(conn, db_url):
    # GIVEN batch A whose head fails on its first attempt, then a second task; and B
    a_ids = enqueue_many(conn, [("A", {"fail_attempts": 1}), ("A", {"n": 1})])
    (b_id,) = enqueue_many(conn, [("B", {"n": 0})])
    seen: list[tuple[int, int]] = []

    def processor(task):
        seen.append((task.id, task.attempt))
        if task.attempt <= task.payload.get("fail_attempts", 0):
            raise RuntimeError("failed on purpose\x00 with a NUL")

    holder = ConnectionHolder(db_url)
    worker = Worker(
        holder,
        db.settings(db_url, RETRY_BASE_SECONDS=1, RETRY_MAX_SECONDS=1),
        processor,
    )

    # WHEN a worker runs A
    failed = worker.run("worker-1", preferred_batch_id="A")

    # THEN the head failed, stays at the head with its error and a retry time, and the
    # lease is given back
    assert failed.outcome == Outcome.TASK_FAILED
    assert failed.failed_task_id == a_ids[0]
    head = db.task(conn, a_ids[0])
    assert head["LastError"] == "RuntimeError: failed on purpose with a NUL"
    assert head["NotBefore"] is not None
    assert db.lease(conn, "A")["LockedBy"] is None

    # WHEN workers run before the retry time
    while_waiting = worker.run("worker-2", preferred_batch_id="A")

    # THEN they work B, and never A's second task
    assert while_waiting.batch_id == "B"
    assert seen == [(a_ids[0], 1), (b_id, 1)]

    # WHEN a worker runs after the retry time
    db.wait_until(
        lambda: conn.execute(
            'SELECT "NotBefore" <= statement_timestamp() FROM "Tasks" WHERE "Id" = %s',
            (a_ids[0],),
        ).fetchone()[0],
        timeout=10,
        what="the retry time",
    )
    retried = worker.run("worker-3")

    # THEN the head is retried first, as attempt 2, then the next task
    assert retried.outcome == Outcome.DRAINED
    assert seen == [(a_ids[0], 1), (b_id, 1), (a_ids[0], 2), (a_ids[1], 1)]
    assert db.pending_ids(conn) == []
    holder.discard()
