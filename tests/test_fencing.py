"""A stale owner is fenced off: once its lease is taken over, its writes do nothing."""

import threading
import time

import psycopg
import pytest

from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many
from queue_core.lease import claim_batch, release
from queue_core.queries import query
from tests.support import db

SHORT_LEASE = 0.3
# Generous, so that only the fencing token can stop a stale owner's statement.
LONG_LEASE = 300


@pytest.fixture
def second_conn(db_url):
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


def test_stale_owner_statements_change_nothing_after_a_takeover(conn, second_conn):
    # GIVEN batch A with two tasks, claimed by worker-1
    ids = enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])
    old = claim_batch(conn, "worker-1", SHORT_LEASE).lease
    assert old is not None and old.batch_id == "A"

    # AND worker-1's lease expired and worker-2 took the batch over
    db.wait_until(
        lambda: db.lease_expired(conn, "A", SHORT_LEASE),
        timeout=10,
        what="the lease to expire",
    )
    new = claim_batch(second_conn, "worker-2", SHORT_LEASE).lease
    assert new is not None
    assert new.batch_id == "A"
    assert new.taken_over_from == "worker-1"
    assert new.fencing_token > old.fencing_token
    before = db.table_state(conn)

    # WHEN worker-1 goes on with its old token: locks the head, completes it (keeping or
    # giving back the lease), records a failure, releases the lease
    stale = {
        "batch_id": "A",
        "fencing_token": old.fencing_token,
        "lease_seconds": LONG_LEASE,
        "max_attempts": 5,
        "on_exhausted": "dead-letter",
    }
    locked = conn.execute(query("lock_head"), stale).fetchall()
    completed = [
        conn.execute(
            query("complete_task"),
            {**stale, "task_id": ids[0], "keep_lease": keep_lease},
        ).fetchone()
        for keep_lease in (True, False)
    ]
    failed = conn.execute(
        query("record_failure"),
        {**stale, "task_id": ids[0], "error": "late", "retry_delay_seconds": 60},
    ).fetchall()
    released = release(conn, old)

    # THEN none of them did anything
    assert locked == []
    assert [row[:3] for row in completed] == [(0, 0, False), (0, 0, False)]
    assert failed == []
    assert released is False
    assert db.table_state(conn) == before

    # AND worker-2 still owns the batch, and its own token still works
    assert db.lease(conn, "A")["LockedBy"] == "worker-2"
    head = second_conn.execute(
        query("lock_head"),
        {"batch_id": "A", "fencing_token": new.fencing_token, "lease_seconds": 300},
    ).fetchone()
    assert head[0] == ids[0] and head[1] == ids[0]


def test_claims_count_a_start_of_the_head_and_raise_the_token(conn, second_conn):
    # GIVEN batch A with one task
    (task_id,) = enqueue_many(conn, [("A", {})])

    # WHEN worker-1 claims it, lets the lease expire, and worker-2 claims it
    first = claim_batch(conn, "worker-1", SHORT_LEASE).lease
    db.wait_until(
        lambda: db.lease_expired(conn, "A", SHORT_LEASE),
        timeout=10,
        what="the lease to expire",
    )
    second = claim_batch(second_conn, "worker-2", SHORT_LEASE).lease

    # THEN every claim raised the fencing token and counted one start of the head
    assert second.fencing_token == first.fencing_token + 1
    assert db.task(conn, task_id)["Attempts"] == 2

    # AND while worker-2's lease holds, nobody else can claim the batch
    assert claim_batch(conn, "worker-3", LONG_LEASE).lease is None
    assert db.lease(conn, "A")["LockedBy"] == "worker-2"


def test_owner_whose_lease_expires_mid_task_loses_it_and_the_task_is_redone(
    conn, db_url
):
    # GIVEN batch A with two tasks
    ids = enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])

    # AND worker-1 in the middle of A's head, its processor blocked
    in_task, let_go = threading.Event(), threading.Event()
    seen: list[tuple[str, int, int]] = []

    def blocking(task):
        seen.append(("worker-1", task.id, task.attempt))
        in_task.set()
        assert let_go.wait(timeout=30)

    lease_settings = db.settings(db_url, LEASE_TIMEOUT_SECONDS=1)
    first = Worker(ConnectionHolder(db_url), lease_settings, blocking)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(first.run("worker-1")))
    thread.start()
    try:
        assert in_task.wait(timeout=30)

        # AND its lease has expired
        db.wait_until(
            lambda: db.lease_expired(conn, "A", 1),
            timeout=10,
            what="the lease to expire",
        )

        # WHEN worker-2 runs while worker-1 still holds the head
        def recording(task):
            seen.append(("worker-2", task.id, task.attempt))

        holder = ConnectionHolder(db_url)
        second = Worker(holder, lease_settings, recording)
        busy = second.run("worker-2")

        # THEN worker-2 backs off: the head is never skipped
        assert busy.outcome == Outcome.BATCH_BUSY
        assert db.task(conn, ids[1])["Attempts"] == 0
    finally:
        # WHEN worker-1's task finishes
        let_go.set()
        thread.join(timeout=30)

    # THEN worker-1 finds its lease lost and deletes nothing
    (late,) = outcome
    assert late.outcome == Outcome.LEASE_LOST
    assert late.completed == []
    assert db.pending_ids(conn, "A") == ids

    # WHEN worker-2 runs again
    report = second.run("worker-2")

    # THEN it redoes the head as attempt 2, then the rest, each once
    assert report.outcome == Outcome.DRAINED
    assert report.taken_over_from == "worker-1"
    assert seen == [
        ("worker-1", ids[0], 1),
        ("worker-2", ids[0], 2),
        ("worker-2", ids[1], 1),
    ]
    assert db.pending_ids(conn) == []
    holder.discard()


def test_release_by_a_stale_owner_leaves_the_new_owners_lease(conn, second_conn):
    # GIVEN worker-2 took batch A over from worker-1 and then gave it back
    enqueue_many(conn, [("A", {})])
    old = claim_batch(conn, "worker-1", SHORT_LEASE).lease
    db.wait_until(
        lambda: db.lease_expired(conn, "A", SHORT_LEASE),
        timeout=10,
        what="the lease to expire",
    )
    new = claim_batch(second_conn, "worker-2", SHORT_LEASE).lease
    assert release(second_conn, new) is True

    # AND worker-3 claimed it afresh
    newest = claim_batch(second_conn, "worker-3", LONG_LEASE).lease
    assert newest is not None
    before = db.table_state(conn)

    # WHEN worker-1 and worker-2 release with their old tokens
    released = [release(conn, old), release(conn, new)]

    # THEN neither touches worker-3's lease
    assert released == [False, False]
    assert db.table_state(conn) == before
    assert db.lease(conn, "A")["LockedBy"] == "worker-3"


def test_each_completion_renews_the_lease_so_a_long_batch_keeps_its_owner(conn, db_url):
    # GIVEN batch A whose tasks together take longer than the lease, each far shorter
    ids = enqueue_many(conn, [("A", {"n": n}) for n in range(8)])
    lease_settings = db.settings(db_url, LEASE_TIMEOUT_SECONDS=1.5)
    owner_seen: list[int] = []

    owner_started = threading.Event()

    def slow(task):
        owner_seen.append(task.id)
        owner_started.set()
        time.sleep(0.25)

    owner = Worker(ConnectionHolder(db_url), lease_settings, slow)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(owner.run("owner")))

    # WHEN the owner works it while a rival keeps trying to claim it
    rival_seen: list[int] = []
    rival_holder = ConnectionHolder(db_url)
    rival = Worker(rival_holder, lease_settings, lambda t: rival_seen.append(t.id))
    thread.start()
    assert owner_started.wait(timeout=30)
    rival_outcomes = set()
    while thread.is_alive():
        rival_outcomes.add(rival.run("rival").outcome)
        time.sleep(0.05)
    thread.join()
    rival_holder.discard()

    # THEN the owner kept the lease to the end and worked every task, the rival none
    assert outcome[0].outcome == Outcome.DRAINED
    assert owner_seen == ids
    assert rival_seen == []
    assert rival_outcomes <= {Outcome.NO_WORK, Outcome.BATCH_BUSY}


def test_processor_receives_the_fencing_token_of_its_lease(db_url, conn):
    # GIVEN a task, and a processor that notes the token it is handed
    enqueue_many(conn, [("A", {"n": 1})])
    tokens: list[int] = []
    holder = ConnectionHolder(db_url)
    worker = Worker(
        holder, db.settings(db_url), lambda task: tokens.append(task.fencing_token)
    )

    # WHEN a worker works the batch
    report = worker.run("worker-1")
    holder.discard()

    # THEN the processor saw the lease's token, to fence its own writes elsewhere
    assert tokens == [report.fencing_token] and report.fencing_token > 0
