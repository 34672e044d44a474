"""The per-batch marker of pending work: set with every insert, cleared only when a
batch is certainly empty, never lost, and the claim walks its index."""

import json
import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from queue_core import ConnectionHolder, Outcome, Worker, enqueue, enqueue_many
from queue_core.lease import claim_batch
from queue_core.queries import query
from tests.conftest import REPO_ROOT
from tests.support import db

NO_WORK = "queue_core.processor:no_work"


def marker(conn: psycopg.Connection, batch_id: str) -> bool:
    return conn.execute(
        'SELECT "MaybePending" FROM "BatchLocks" WHERE "BatchId" = %s', (batch_id,)
    ).fetchone()[0]


def impatient_worker(db_url: str) -> tuple[Worker, ConnectionHolder]:
    """A worker whose statements give up after 2 s spent waiting for a lock."""
    url = make_conninfo(db_url, options="-c lock_timeout=2000")
    holder = ConnectionHolder(url)
    return Worker(holder, db.settings(db_url, TASK_PROCESSOR=NO_WORK)), holder


def test_enqueue_sets_the_marker_and_draining_clears_it(conn, db_url):
    # GIVEN a batch with two tasks
    enqueue_many(conn, [("A", {}), ("A", {})])
    assert marker(conn, "A") is True

    # WHEN a worker drains it
    worker, holder = impatient_worker(db_url)
    report = worker.run("w1")
    holder.discard()

    # THEN the batch is empty and marked so
    assert (report.outcome, len(report.completed)) == (Outcome.DRAINED, 2)
    assert marker(conn, "A") is False


def test_an_insert_by_other_means_sets_the_marker_too(conn):
    # GIVEN a batch that was drained (its lease row exists, marked empty)
    conn.execute('INSERT INTO "BatchLocks" ("BatchId") VALUES (%s)', ("legacy",))
    assert marker(conn, "legacy") is False

    # WHEN an application inserts a task with its own SQL, as the original API did
    conn.execute('INSERT INTO "Tasks" ("BatchId") VALUES (%s)', ("legacy",))

    # THEN the batch is marked
    assert marker(conn, "legacy") is True


def test_an_open_enqueue_transaction_does_not_hold_up_the_batch_owner(conn, db_url):
    # GIVEN a batch with three tasks, and an application transaction that enqueued a
    # fourth into it and stays open
    ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])
    with psycopg.connect(db_url) as app:
        late_id = enqueue(app, "A", {"n": 3})

        # WHEN a worker that gives up after waiting 2 s for any lock drains A
        worker, holder = impatient_worker(db_url)
        report = worker.run("w1")

        # THEN it completed the three committed tasks without waiting
        assert report.outcome == Outcome.DRAINED
        assert [task.task_id for task in report.completed] == ids
        # AND the marker stayed: the open transaction may still commit a task
        assert marker(conn, "A") is True
        app.commit()

    # AND once it commits, the late task is claimed and worked
    report = worker.run("w2")
    holder.discard()
    assert [task.task_id for task in report.completed] == [late_id]
    assert marker(conn, "A") is False


def test_an_open_enqueue_into_an_idle_batch_holds_up_no_claimer(conn, db_url):
    # GIVEN an idle batch B (drained before) and a batch C with work
    enqueue(conn, "B", {})
    worker, holder = impatient_worker(db_url)
    assert worker.run("w0").outcome == Outcome.DRAINED
    assert marker(conn, "B") is False
    c_ids = enqueue_many(conn, [("C", {}), ("C", {})])

    with psycopg.connect(db_url) as app:
        # WHEN an application enqueues into B and keeps its transaction open
        b_id = enqueue(app, "B", {})

        # THEN claimers, even one that prefers B, pass over B without waiting
        report = worker.run("w1", preferred_batch_id="B")
        assert (report.batch_id, report.outcome) == ("C", Outcome.DRAINED)
        assert [task.task_id for task in report.completed] == c_ids
        assert worker.run("w2").outcome == Outcome.NO_WORK
        app.commit()

    # AND after the commit B is claimable
    report = worker.run("w3")
    holder.discard()
    assert (report.batch_id, [t.task_id for t in report.completed]) == ("B", [b_id])


def test_a_task_inserted_while_the_marker_is_cleared_sets_it_back(conn, db_url):
    # GIVEN an empty batch whose marker a worker is clearing, not yet committed
    enqueue(conn, "A", {})
    conn.execute('DELETE FROM "Tasks"')
    clearer = psycopg.connect(db_url)
    clearer.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
    assert clearer.execute(query("clear_marker"), {"batch_id": "A"}).fetchone()[0]

    # WHEN an application enqueues into it meanwhile (it waits for the clearer)
    inserted: list[int] = []
    with psycopg.connect(db_url, autocommit=True) as app:
        thread = threading.Thread(target=lambda: inserted.append(enqueue(app, "A")))
        thread.start()
        time.sleep(0.3)
        assert inserted == [], "the insert should wait for the clearing transaction"
        clearer.commit()
        thread.join(timeout=10)
    clearer.close()

    # THEN the task is there and the batch is marked again
    assert db.pending_ids(conn, "A") == inserted
    assert marker(conn, "A") is True


def test_a_stale_marker_is_cleared_by_the_claimer_that_meets_it(conn):
    # GIVEN a batch marked as maybe pending that has no task (its enqueue rolled back
    # while its owner was finding it empty, say)
    enqueue(conn, "ghost", {})
    conn.execute('DELETE FROM "Tasks"')
    assert marker(conn, "ghost") is True

    # WHEN a worker tries to claim
    claim = claim_batch(conn, "w1", 300)

    # THEN there is no work, and the marker is cleared
    assert claim.lease is None and claim.busy_batch_ids == []
    assert marker(conn, "ghost") is False


def test_enqueue_in_repeatable_read_marks_the_batch(conn, db_url):
    # GIVEN a drained batch
    enqueue(conn, "A", {})
    conn.execute('DELETE FROM "Tasks"')
    claim_batch(conn, "w0", 300)
    assert marker(conn, "A") is False

    # WHEN an application enqueues into it in a REPEATABLE READ transaction
    with psycopg.connect(db_url) as app:
        app.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        enqueue(app, "A", {})

    # THEN the batch is marked
    assert marker(conn, "A") is True


@pytest.mark.parametrize("name", ["claim_batch", "dispatch_status"])
def test_claim_and_dispatch_walk_the_marker_index_not_every_batch(conn, name):
    # GIVEN 20,000 idle batches and one with work
    conn.execute(
        """INSERT INTO "BatchLocks" ("BatchId", "LockedAt")
           SELECT 'idle-' || n, now() - n * interval '1 second'
           FROM generate_series(1, 20000) AS n"""
    )
    enqueue(conn, "busy", {})
    conn.execute('ANALYZE "BatchLocks"')
    conn.execute('ANALYZE "Tasks"')

    # WHEN the planner plans the claim and the dispatcher's query
    params = {
        "worker_id": "w1",
        "lease_seconds": 300,
        "preferred_batch_id": None,
        "busy_batch_ids": [],
        "max_attempts": 5,
        "on_exhausted": "dead-letter",
        "limit": 10,
    }
    plan = "\n".join(
        row[0] for row in conn.execute("EXPLAIN " + query(name), params).fetchall()
    )

    # THEN it reads "BatchLocks" through the marker's partial index only
    assert "IX_BatchLocks_MaybePending_LockedAt" in plan, plan
    assert 'Seq Scan on "BatchLocks"' not in plan, plan


@pytest.mark.slow
def test_no_marker_is_lost_when_enqueues_race_drains(conn, db_url, tmp_path):
    # GIVEN enqueuers (some rolling back, some in REPEATABLE READ), workers and a
    # checker, each its own process, on three shared batches
    seconds = "4"
    roles = ["enqueuer"] * 4 + ["worker"] * 2 + ["checker"]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
        "DATABASE_URL": db_url,
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.marker_race", role, seconds, str(n)],
            cwd=REPO_ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n, role in enumerate(roles)
    ]

    # WHEN they race for a few seconds
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))

    # THEN the checker never saw a committed task behind a "certainly empty" marker
    (check,) = [r for r in results if r["role"] == "checker"]
    assert check["checks"] > 0 and check["lost"] == 0, results
    enqueued = sum(r["committed"] for r in results if r["role"] == "enqueuer")
    completed = sum(r["completed"] for r in results if r["role"] == "worker")
    assert enqueued > 0 and completed > 0, results

    # AND every task left is claimable: a worker drains the queue to empty
    worker, holder = impatient_worker(db_url)
    deadline = time.monotonic() + 60
    while db.pending_ids(conn) and time.monotonic() < deadline:
        worker.run("sweeper")
    holder.discard()
    assert db.pending_ids(conn) == []
    assert completed + 0 <= enqueued
