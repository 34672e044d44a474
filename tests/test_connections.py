"""The handler's connection: reused while warm, replaced when the server ends it."""

import json

import pytest

from queue_core import (
    ConnectionHolder,
    DatabaseUnavailable,
    Outcome,
    Settings,
    Worker,
    enqueue_many,
)
from tests.support import db
from tests.support.events import load_event, with_unique_ids
from tests.support.lambda_context import LambdaContext


def invoke(app, name: str):
    return app.lambda_handler(with_unique_ids(load_event(name)), LambdaContext(60))


def backend_pid(app) -> int:
    return app._connections.get().info.backend_pid


def test_warm_invocations_reuse_one_connection(handler_app, conn):
    # GIVEN a task in each of two batches
    enqueue_many(conn, [("A", {}), ("B", {})])

    # WHEN the handler is invoked twice in the same warm environment
    first = invoke(handler_app, "schedule-default")
    pid = backend_pid(handler_app)
    second = invoke(handler_app, "schedule-default")

    # THEN both did their work over the same server session, opened once
    assert sorted([first["batchId"], second["batchId"]]) == ["A", "B"]
    assert backend_pid(handler_app) == pid
    assert handler_app._connections.connects == 1


def test_invocation_after_the_session_was_terminated_uses_a_new_one(handler_app, conn):
    # GIVEN a warm handler whose session another connection has terminated
    enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])
    invoke(handler_app, "schedule-default")
    pid = backend_pid(handler_app)
    assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    db.wait_until(
        lambda: (
            not conn.execute(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", (pid,)
            ).fetchone()[0]
        ),
        timeout=10,
        what="the session to end",
    )
    enqueue_many(conn, [("B", {"n": 0})])

    # WHEN the next invocation arrives
    report = invoke(handler_app, "schedule-default")

    # THEN it succeeds, on a new session
    assert report["outcome"] == "drained"
    assert report["batchId"] == "B"
    assert backend_pid(handler_app) != pid
    assert handler_app._connections.connects == 2
    assert db.pending_ids(conn) == []


@pytest.fixture
def unreachable_handler(handler_app, tmp_path, monkeypatch):
    """The handler pointed at a Unix socket where no server listens."""
    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql://postgres@/postgres?host={tmp_path}"
    )
    monkeypatch.setenv("CONNECT_TIMEOUT_SECONDS", "1")
    return handler_app


def test_function_url_answers_503_when_the_database_is_unreachable(
    unreachable_handler,
):
    # WHEN POST /process-task arrives and no database answers, even after retries
    response = invoke(unreachable_handler, "function-url-process-task")

    # THEN the caller is told to retry later, without any connection detail
    assert response["statusCode"] == 503
    body = json.loads(response["body"])
    assert body["problems"] == [
        {"field": "database", "rule": "is unreachable, retry later"}
    ]
    assert "postgres" not in response["body"]


def test_direct_invoke_fails_when_the_database_is_unreachable(unreachable_handler):
    # WHEN the function is invoked directly and no database answers
    # THEN the invocation fails with DatabaseUnavailable, so Lambda may retry it
    with pytest.raises(DatabaseUnavailable):
        invoke(unreachable_handler, "direct-invoke")


@pytest.mark.parametrize(("pooler", "threshold"), [("none", 0), ("transaction", None)])
def test_statements_are_prepared_unless_behind_a_transaction_pooler(
    db_url, pooler, threshold
):
    # GIVEN a deployment with or without a transaction-mode pooler
    settings = Settings.from_env({"DATABASE_URL": db_url, "DB_POOLER": pooler})

    # WHEN the worker's connection is opened
    holder = ConnectionHolder.for_settings(settings)
    connection = holder.get()

    # THEN statements are prepared at first use only where a session is the client's
    assert connection.prepare_threshold == threshold
    assert settings.session_options is (pooler == "none")
    holder.discard()


def test_a_warm_worker_keeps_its_prepared_statements_from_batch_to_batch(db_url, conn):
    # GIVEN five batches to drain and a worker on a connection that prepares statements
    # (psycopg forgets every prepared statement when it sees a ROLLBACK)
    enqueue_many(conn, [(batch, {}) for batch in "ABCDE" for _ in range(2)])
    settings = Settings.from_env(
        {"DATABASE_URL": db_url, "TASK_PROCESSOR": "queue_core.processor:no_work"}
    )
    holder = ConnectionHolder.for_settings(settings)
    worker = Worker(holder, settings)

    # WHEN it drains them one after another, then finds nothing
    reports = worker.run_batches("w1", max_batches=6)

    # THEN each statement was prepared once and reused for every batch
    assert [r.outcome for r in reports] == [Outcome.DRAINED] * 5 + [Outcome.NO_WORK]
    executions = dict(
        holder.get()
        .execute(
            "SELECT split_part(ltrim(statement), ' ', 2),"
            " generic_plans + custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE 'WITH %'"
        )
        .fetchall()
    )
    assert executions["preferred"] == 6  # claim_batch: one per run
    assert executions["next"] == 10  # complete_task: one per task
    holder.discard()
