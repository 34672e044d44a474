"""Behind a transaction-mode pooler (a real PgBouncer): the worker keeps no session
state between transactions, so FIFO per batch and one owner per batch still hold when
consecutive transactions of one worker run on different server sessions."""

import collections

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from queue_core import ConnectionHolder, Worker, enqueue_many
from tests.support import db
from tests.support.pgbouncer import POOL_SIZE, running_pgbouncer
from tests.support.processors import read_records, record

BATCHES = ["A", "B", "C"]
TASKS_PER_BATCH = 8
WORKERS = 6
CALM_OUTCOMES = {"drained", "time_up", "no_work", "batch_busy"}


@pytest.fixture(scope="module")
def pgbouncer(postgres_url):
    """A PgBouncer in transaction mode of this module's own."""
    with running_pgbouncer(postgres_url) as bouncer:
        yield bouncer


@pytest.fixture
def pooled_url(pgbouncer, db_url) -> str:
    """The test's database, reached through PgBouncer."""
    return pgbouncer.url(conninfo_to_dict(db_url)["dbname"])


def backend_pid(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_pooler_runs_one_clients_transactions_on_different_sessions(
    pooled_url,
    pgbouncer,
):
    # GIVEN a client whose last statement ran on some server session
    with psycopg.connect(pooled_url, autocommit=True) as client:
        first = backend_pid(client)

        # WHEN other clients hold transactions until one of them holds that session
        others = []
        try:
            for _ in range(POOL_SIZE - 1):
                other = psycopg.connect(pooled_url, autocommit=True)
                others.append(other)
                other.execute("BEGIN")
                if backend_pid(other) == first:
                    break
            else:
                pytest.fail("no other client was given the session just released")

            # THEN the client's next statement runs on another session: anything a
            # session kept (a SET, a prepared statement, a LISTEN, an advisory lock)
            # would be gone for it
            assert backend_pid(client) != first
        finally:
            for other in others:
                other.close()

    dbname = conninfo_to_dict(pooled_url)["dbname"]
    modes = {
        row["pool_mode"]
        for row in pgbouncer.admin("SHOW POOLS")
        if row["database"] == dbname
    }
    assert modes == {"transaction"}


def test_one_worker_works_a_batch_through_the_pooler(pooled_url, conn, records_file):
    # GIVEN tasks in one batch, and a worker connected through PgBouncer
    ids = enqueue_many(conn, [("A", {"n": n}) for n in range(5)])
    settings = db.settings(
        pooled_url, TASK_BUDGET_SECONDS=0.1, SAFETY_MARGIN_SECONDS=0.1
    )
    holder = ConnectionHolder(pooled_url)

    # WHEN it works the batch (pipelined delete, commit, begin, lock of the next head)
    report = Worker(holder, settings, processor=record).run("pooled-1")
    holder.discard()

    # THEN every task was done once, in order
    assert report.outcome == "drained"
    assert [task.task_id for task in report.completed] == ids
    assert db.pending_ids(conn) == []


@pytest.mark.slow
def test_concurrent_workers_through_pgbouncer_keep_fifo_and_one_owner(
    conn,
    pooled_url,
    pgbouncer,
    worker_processes,
    records_file,
):
    # GIVEN 24 tasks over three batches, enqueued interleaved
    ids = enqueue_many(
        conn,
        [(batch, {"n": n}) for n in range(TASKS_PER_BATCH) for batch in BATCHES],
    )
    expected = {
        batch: ids[index :: len(BATCHES)] for index, batch in enumerate(BATCHES)
    }
    dbname = conninfo_to_dict(pooled_url)["dbname"]

    # WHEN six worker processes call the handler through PgBouncer, which lends their
    # twelve connections three server sessions, until the queue is empty
    processes = [
        worker_processes.start(
            "--events",
            "schedule-default,function-url-process-task,direct-invoke",
            "--until-empty",
            "--remaining-seconds",
            "0.25-0.4",
            "--deadline-seconds",
            "90",
            "--seed",
            str(number),
            env={
                "DATABASE_URL": pooled_url,
                # No startup options, no prepared statements: bounds go per
                # transaction and every statement is planned in its transaction.
                "DB_POOLER": "transaction",
                "TASK_BUDGET_SECONDS": "0.1",
                "SAFETY_MARGIN_SECONDS": "0.1",
                "RECORD_SLEEP_SECONDS": "0.02",
            },
            wait_for_go=True,
        )
        for number in range(WORKERS)
    ]
    worker_processes.release_together(processes)
    for process in processes:
        code = worker_processes.wait(process, timeout=120)
        assert code == 0, worker_processes.output(process) + pgbouncer.log()

    # THEN every task was completed exactly once, and calmly
    assert db.pending_ids(conn) == []
    reports = read_records(worker_processes.reports_file)
    completed = collections.Counter(
        task_id for report in reports for task_id in report["completed"]
    )
    assert completed == collections.Counter(ids)
    assert {report["outcome"] for report in reports} <= CALM_OUTCOMES

    # AND per batch, tasks ran in "Id" order, one at a time, each start and end by the
    # same process
    records = read_records(records_file)
    for batch in BATCHES:
        lines = [line for line in records if line["batch_id"] == batch]
        starts, ends = lines[0::2], lines[1::2]
        assert [line["event"] for line in lines] == ["start", "end"] * TASKS_PER_BATCH
        assert [line["task_id"] for line in starts] == expected[batch]
        assert [line["task_id"] for line in ends] == expected[batch]
        assert all(
            start["pid"] == end["pid"] for start, end in zip(starts, ends, strict=True)
        )

    # AND the work really went through the pooler, on no more server sessions than
    # its pool holds, while more clients than that were connected
    (pool,) = [
        row for row in pgbouncer.admin("SHOW POOLS") if row["database"] == dbname
    ]
    assert pool["pool_mode"] == "transaction"
    servers = [
        row for row in pgbouncer.admin("SHOW SERVERS") if row["database"] == dbname
    ]
    assert 1 <= len(servers) <= POOL_SIZE
    (stats,) = [
        row for row in pgbouncer.admin("SHOW STATS") if row["database"] == dbname
    ]
    assert stats["total_xact_count"] >= len(ids)
    assert len({record["pid"] for record in records}) > 1
