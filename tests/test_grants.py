"""The workers' role, with exactly the rights of sql/worker_grants.sql, can run every
statement of the queue: the scheduled tick, the worker loop, failures, dead letters and
the operator's commands. PostgreSQL checks privileges when a statement starts, so a
missing grant fails even on a path that would not have written to that table."""

import itertools
import os
import re

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from queue_core import enqueue_many
from queue_core.queries import load_named, query, sql_dir
from tests.conftest import REPO_ROOT
from tests.support.events import load_event, with_unique_ids
from tests.support.lambda_context import LambdaContext

_numbers = itertools.count(1)


@pytest.fixture
def worker_url(db_url, conn):
    """The test's database, as a fresh role that has only the documented grants."""
    role = f"queue_worker_test_{os.getpid()}_{next(_numbers)}"
    password = "grants-test"
    conn.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)
        )
    )
    grants = (REPO_ROOT / "sql" / "worker_grants.sql").read_text()
    conn.execute(re.sub(r"\bqueue_worker\b", f'"{role}"', grants))
    yield make_conninfo(db_url, user=role, password=password)
    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_grants_are_the_ones_the_deploy_guide_gives():
    documented = (REPO_ROOT / "docs" / "deploy.md").read_text()
    for line in (REPO_ROOT / "sql" / "worker_grants.sql").read_text().splitlines():
        if line.startswith("GRANT"):
            assert line in documented, line


@pytest.mark.parametrize("name", sorted(load_named(sql_dir() / "queries.sql")))
def test_the_worker_role_may_run_every_named_statement(worker_url, name):
    # WHEN the role plans the statement (EXPLAIN checks every privilege it needs)
    statement = query(name)
    params = {key: None for key in re.findall(r"%\((\w+)\)s", statement)}
    with psycopg.connect(worker_url, autocommit=True) as role_conn:
        assert conninfo_to_dict(worker_url)["user"] == role_conn.info.user
        role_conn.execute("EXPLAIN " + statement, params)


def test_the_worker_role_enqueues_and_drains_through_the_handler(
    worker_url, handler_app, conn, monkeypatch
):
    # GIVEN the handler logged in as the workers' role, and a task it enqueued itself
    # (the marker trigger and the marker-clearing function run with its rights)
    monkeypatch.setenv("DATABASE_URL", worker_url)
    with psycopg.connect(worker_url, autocommit=True) as role_conn:
        (task_id,) = enqueue_many(role_conn, [("A", {"n": 1})])

    # WHEN the schedule ticks
    report = handler_app.lambda_handler(
        with_unique_ids(load_event("schedule-default")), LambdaContext(30)
    )

    # THEN the task is done and the batch's marker cleared
    assert report["outcome"] == "drained" and report["completed"] == [task_id]
    assert conn.execute(
        """SELECT "MaybePending" FROM "BatchLocks" WHERE "BatchId" = 'A'"""
    ).fetchone() == (False,)
