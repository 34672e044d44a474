"""Reading the queue's tables, and waiting on them, from the tests."""

import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from queue_core import Settings

T = TypeVar("T")


def settings(database_url: str, **env: str | float) -> Settings:
    """Settings as a worker reads them from its environment, with these overrides."""
    return Settings.from_env(
        {
            "DATABASE_URL": database_url,
            **{key: str(value) for key, value in env.items()},
        }
    )


def table_state(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    """Every row of both tables, to compare before and after."""
    tasks = conn.execute(
        'SELECT "Id", "BatchId", "Payload", "EnqueuedAt", "Attempts", "NotBefore",'
        ' "LastError" FROM "Tasks" ORDER BY "Id"'
    ).fetchall()
    leases = conn.execute(
        'SELECT "BatchId", "LockedBy", "LockedAt", "FencingToken"'
        ' FROM "BatchLocks" ORDER BY "BatchId"'
    ).fetchall()
    return {"tasks": tasks, "leases": leases}


def task(conn: psycopg.Connection, task_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            'SELECT * FROM "Tasks" WHERE "Id" = %s', (task_id,)
        ).fetchone()


def lease(conn: psycopg.Connection, batch_id: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            'SELECT * FROM "BatchLocks" WHERE "BatchId" = %s', (batch_id,)
        ).fetchone()


def pending_ids(conn: psycopg.Connection, batch_id: str | None = None) -> list[int]:
    rows = conn.execute(
        'SELECT "Id" FROM "Tasks"'
        ' WHERE %(batch)s::text IS NULL OR "BatchId" = %(batch)s ORDER BY "Id"',
        {"batch": batch_id},
    ).fetchall()
    return [row[0] for row in rows]


def lease_expired(
    conn: psycopg.Connection, batch_id: str, lease_seconds: float
) -> bool:
    """Whether a claimer using lease_seconds would now see the lease as expired."""
    return conn.execute(
        'SELECT "LockedAt" <= statement_timestamp() - make_interval(secs => %s)'
        ' FROM "BatchLocks" WHERE "BatchId" = %s',
        (lease_seconds, batch_id),
    ).fetchone()[0]


def wait_until(
    probe: Callable[[], T], timeout: float, what: str, interval: float = 0.01
) -> T:
    """Poll probe until it returns something truthy; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
