"""The statements that find a batch's head read that batch's index entries, not the
tasks of every other batch enqueued before it.

The shape that once made them slow: a few batches, a large backlog in all but one, and
the last batch's tasks enqueued after all of it. A statement whose plan walks the
primary key in "Id" order and filters on the batch reads the whole backlog before
reaching that batch's head. Plans are forced generic, as a warm worker's become.
"""

import psycopg
import pytest

from queue_core import enqueue_many
from queue_core.lease import claim_batch
from queue_core.queries import query

BACKLOG = 90_000  # tasks ahead of the late batch, over 1 or 9 other batches
LATE = "late"

LEASE = {"lease_seconds": 300, "max_attempts": 5, "on_exhausted": "dead-letter"}


@pytest.fixture(params=[1, 9], ids=["backlog in 1 batch", "backlog in 9 batches"])
def late_batch(conn, request) -> psycopg.Connection:
    """A backlog in other batches, then 10 tasks of batch "late"; statistics fresh."""
    others = request.param
    enqueue_many(conn, [(f"b{n}", {}) for n in range(others)])
    conn.execute(
        """INSERT INTO "Tasks" ("BatchId")
           SELECT 'b' || (n %% %s) FROM generate_series(1, %s) AS n ORDER BY n""",
        (others, BACKLOG),
    )
    enqueue_many(conn, [(LATE, {"n": n}) for n in range(10)])
    # The backlog's batches were worked a moment ago: the late batch is next in line.
    conn.execute(
        """UPDATE "BatchLocks" SET "LockedAt" = now() WHERE "BatchId" <> %s""", (LATE,)
    )
    conn.execute('VACUUM ANALYZE "Tasks"')
    conn.execute('VACUUM ANALYZE "BatchLocks"')
    return conn


def tasks_read(conn: psycopg.Connection, statement: str, params: dict) -> int:
    """Rows of "Tasks" read by one run of the statement (rolled back)."""
    conn.execute("BEGIN")
    try:
        before = _rows_read(conn)  # counts not yet flushed from earlier statements
        conn.execute(statement, params, prepare=True)
        return _rows_read(conn) - before
    finally:
        conn.execute("ROLLBACK")


def _rows_read(conn: psycopg.Connection) -> int:
    return conn.execute(
        """SELECT coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0)
           FROM pg_stat_xact_user_tables WHERE relname = 'Tasks'"""
    ).fetchone()[0]


@pytest.fixture
def generic(db_url) -> psycopg.Connection:
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("SET plan_cache_mode = force_generic_plan")
        yield connection


def test_claim_and_tick_find_the_late_batch_head_without_reading_the_backlog(
    late_batch, generic
):
    claim = {
        "worker_id": "w1",
        "preferred_batch_id": None,
        "busy_batch_ids": [],
        **LEASE,
    }
    status = {"lease_seconds": 300, "limit": 1000}

    assert tasks_read(generic, query("claim_batch"), claim) < 100
    # (the tick's gauges count up to 10,000 tasks, on purpose)
    gauges = tasks_read(generic, 'SELECT * FROM "QueueGauges"', {})
    assert gauges <= 10_010
    assert tasks_read(generic, query("dispatch_status"), status) < gauges + 100


def test_owner_locks_and_completes_the_late_batch_head_without_reading_the_backlog(
    late_batch, generic
):
    # GIVEN the late batch claimed
    lease = claim_batch(late_batch, "w1", 300, LATE).lease
    assert lease is not None and lease.batch_id == LATE
    head = late_batch.execute(
        """SELECT min("Id") FROM "Tasks" WHERE "BatchId" = %s""", (LATE,)
    ).fetchone()[0]
    params = {
        "batch_id": LATE,
        "fencing_token": lease.fencing_token,
        "task_id": head,
        "keep_lease": True,
        **LEASE,
    }

    # THEN locking its head and completing it read a handful of rows
    assert tasks_read(generic, query("lock_head"), params) < 100
    assert tasks_read(generic, query("complete_task"), params) < 100
    # AND so do the operator's views of that batch
    assert tasks_read(generic, query("batch_stats"), params) < 100
    assert tasks_read(generic, query("list_batches"), params) < 100
    assert tasks_read(generic, query("pending_task_ids"), params) < 100
    assert tasks_read(generic, query("cancel_batch"), params) < 100


def test_clearing_the_marker_of_a_drained_batch_does_not_read_the_backlog(
    late_batch, generic
):
    # GIVEN the late batch drained, its marker still set
    late_batch.execute('DELETE FROM "Tasks" WHERE "BatchId" = %s', (LATE,))

    # THEN clearing its marker, as a worker does many times over, reads no task
    for _ in range(8):  # past the point where PL/pgSQL settles on a generic plan
        assert tasks_read(generic, query("clear_marker"), {"batch_id": LATE}) < 100
