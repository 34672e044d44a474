"""Server-side bounds of a worker's sessions, and the invocation's time budget."""

import pytest

from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many
from tests.support import db

BOUNDS_ENV = {
    "LEASE_TIMEOUT_SECONDS": 10,
    "SAFETY_MARGIN_SECONDS": 2,
    "STATEMENT_TIMEOUT_SECONDS": 7,
    "LOCK_TIMEOUT_SECONDS": 3,
}
SETTINGS = (
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_timeout",
)


def shown(connection) -> dict[str, str]:
    """The settings in force on the connection, as SHOW reports them."""
    values = {}
    for name in SETTINGS:
        row = connection.execute(
            "SELECT setting FROM pg_settings WHERE name = %s", (name,)
        ).fetchone()
        if row is not None:  # transaction_timeout exists from PostgreSQL 17
            values[name] = connection.execute(f"SHOW {name}").fetchone()[0]
    return values


def server_has_transaction_timeout(conn) -> bool:
    return conn.info.server_version >= 170000


def test_worker_sessions_carry_the_bounds_as_startup_options(conn, db_url):
    # GIVEN a worker's connections, made from its settings
    settings = db.settings(db_url, **BOUNDS_ENV)
    holder = ConnectionHolder.for_settings(settings, "bounded-worker")

    # WHEN a session is opened
    session = shown(holder.get())

    # THEN its statements, lock waits and transactions are bounded on the server,
    # transactions just past the lease (10 s + 2 s margin)
    expected = {
        "statement_timeout": "7s",
        "lock_timeout": "3s",
        "idle_in_transaction_session_timeout": "12s",
    }
    if server_has_transaction_timeout(conn):
        expected["transaction_timeout"] = "12s"
    assert session == expected
    holder.discard()


def test_options_already_in_database_url_are_kept(conn, db_url):
    # GIVEN a DATABASE_URL that carries options of its own
    url = f"{db_url} options='-c search_path=custom,public'"
    settings = db.settings(url, **BOUNDS_ENV)

    # WHEN a worker connects
    holder = ConnectionHolder.for_settings(settings, "bounded-worker")
    connection = holder.get()

    # THEN both its own options and the bounds are in force
    assert connection.execute("SHOW search_path").fetchone()[0] == "custom,public"
    assert shown(connection)["statement_timeout"] == "7s"
    holder.discard()


def test_without_session_options_each_task_transaction_bounds_itself(conn, db_url):
    # GIVEN DB_SESSION_OPTIONS=off, as behind a pooler that refuses startup options
    settings = db.settings(db_url, DB_SESSION_OPTIONS="off", **BOUNDS_ENV)
    holder = ConnectionHolder.for_settings(settings, "pooled-worker")
    defaults = shown(conn)
    enqueue_many(conn, [("A", {}), ("A", {})])

    # WHEN a worker works two tasks, looking at its settings inside each
    inside: list[dict[str, str]] = []
    worker = Worker(holder, settings, lambda _task: inside.append(shown(holder.get())))
    report = worker.run("worker-1")

    # THEN the session itself carries nothing
    assert report.outcome == Outcome.DRAINED
    assert "options" not in holder.get().info.get_parameters()
    assert shown(holder.get()) == defaults

    # AND each task transaction was bounded all the same, with SET LOCAL
    expected = {
        "statement_timeout": "7s",
        "lock_timeout": "3s",
        "idle_in_transaction_session_timeout": "12s",
    }
    if server_has_transaction_timeout(conn):
        expected["transaction_timeout"] = "12s"
    assert inside == [expected, expected]
    holder.discard()


# ---------------------------------------------------------------- the time budget


class Clock:
    """The invocation's remaining time; each task uses one second of it."""

    def __init__(self, remaining: float) -> None:
        self.remaining = remaining

    def time_left(self) -> float:
        return self.remaining

    def task(self, _task) -> None:
        self.remaining -= 1


@pytest.mark.parametrize(
    ("remaining", "tasks_done"),
    [(2.0, 0), (2.01, 1), (3.5, 2), (10, 4)],
    ids=["exactly budget plus margin", "just over", "room for two", "plenty"],
)
def test_task_starts_only_with_time_for_its_budget_and_the_margin(
    conn, db_url, remaining, tasks_done
):
    # GIVEN four tasks, a task budget of 1 s and a safety margin of 1 s
    ids = enqueue_many(conn, [("A", {"n": n}) for n in range(4)])
    clock = Clock(remaining)
    worker = Worker(
        ConnectionHolder(db_url),
        db.settings(db_url, TASK_BUDGET_SECONDS=1, SAFETY_MARGIN_SECONDS=1),
        clock.task,
    )

    # WHEN an invocation with that much time left works the queue
    report = worker.run("worker-1", time_left=clock.time_left)

    # THEN it starts a task only while more than budget + margin is left
    assert [t.task_id for t in report.completed] == ids[:tasks_done]
    assert report.outcome == (Outcome.DRAINED if tasks_done == 4 else Outcome.TIME_UP)

    # AND the first task it did not start was not even counted as started
    assert [db.task(conn, i)["Attempts"] for i in ids[tasks_done:]] == [0] * (
        4 - tasks_done
    )
    assert db.lease(conn, "A")["LockedBy"] is None
