"""Which database errors are retried, and how retrying behaves."""

import psycopg
import pytest
from psycopg import errors

from queue_core import DatabaseUnavailable, enqueue
from queue_core.db import is_transient, retrying
from tests.support import db

TRANSIENT = [
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.AdminShutdown,
    errors.CrashShutdown,
    errors.CannotConnectNow,
    errors.LockNotAvailable,
    errors.QueryCanceled,
    errors.IdleInTransactionSessionTimeout,
    errors.TransactionTimeout,
]
PERMANENT = [
    errors.UniqueViolation,
    errors.ForeignKeyViolation,
    errors.CheckViolation,
    errors.SyntaxError,
    errors.UndefinedTable,
    errors.InvalidTextRepresentation,
    errors.InFailedSqlTransaction,
    errors.InsufficientPrivilege,
]


@pytest.mark.parametrize("error_class", TRANSIENT, ids=lambda c: c.__name__)
def test_conflicts_timeouts_and_shutdowns_are_transient(error_class):
    # WHEN the server reports a conflict, a timeout or a shutdown
    # THEN the same work is worth trying again
    assert is_transient(error_class("from the server"))


@pytest.mark.parametrize("error_class", PERMANENT, ids=lambda c: c.__name__)
def test_errors_in_the_request_itself_are_not_transient(error_class):
    # WHEN the server refuses the request itself
    # THEN trying it again would fail the same way: not transient
    assert not is_transient(error_class("from the server"))


def test_a_lost_connection_without_sqlstate_is_transient():
    # WHEN libpq reports a lost connection (no SQLSTATE), or the error is not the
    # server's
    # THEN only the lost connection is transient
    assert is_transient(psycopg.OperationalError("server closed the connection"))
    assert not is_transient(ValueError("not a database error"))
    assert not is_transient(psycopg.ProgrammingError("misuse of the driver"))


# -------------------------------------------------- the same, from a real server


@pytest.fixture
def other_conn(db_url):
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


def capture(step) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as raised:
        step()
    return raised.value


def test_real_serialization_failure_is_transient(conn, other_conn):
    # GIVEN a repeatable-read transaction that has read a task another then changed
    task_id = enqueue(conn, "A", {})
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    conn.execute('SELECT * FROM "Tasks"').fetchall()
    other_conn.execute('UPDATE "Tasks" SET "Attempts" = 1 WHERE "Id" = %s', (task_id,))

    # WHEN it updates the task too
    error = capture(
        lambda: conn.execute(
            'UPDATE "Tasks" SET "Attempts" = 2 WHERE "Id" = %s', (task_id,)
        )
    )
    conn.execute("ROLLBACK")

    # THEN the error is a serialization failure, worth a retry
    assert isinstance(error, errors.SerializationFailure)
    assert is_transient(error)


def test_real_lock_timeout_and_statement_timeout_are_transient(conn, other_conn):
    # GIVEN a task whose row another transaction holds
    task_id = enqueue(conn, "A", {})
    other_conn.execute("BEGIN")
    other_conn.execute('SELECT FROM "Tasks" WHERE "Id" = %s FOR UPDATE', (task_id,))

    # WHEN a statement cannot have the lock at once, or runs past its timeout
    nowait = capture(
        lambda: conn.execute(
            'SELECT FROM "Tasks" WHERE "Id" = %s FOR UPDATE NOWAIT', (task_id,)
        )
    )
    conn.execute("SET statement_timeout = '50ms'")
    timeout = capture(lambda: conn.execute("SELECT pg_sleep(5)"))
    other_conn.execute("ROLLBACK")

    # THEN both are worth a retry
    assert isinstance(nowait, errors.LockNotAvailable) and is_transient(nowait)
    assert isinstance(timeout, errors.QueryCanceled) and is_transient(timeout)


def test_real_admin_shutdown_is_transient_and_unique_violation_is_not(
    db_url, conn, other_conn
):
    # GIVEN a session the server has terminated
    victim = psycopg.connect(db_url, autocommit=True)
    pid = victim.info.backend_pid
    other_conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    db.wait_until(
        lambda: (
            not other_conn.execute(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", (pid,)
            ).fetchone()[0]
        ),
        timeout=10,
        what="the session to end",
    )

    # WHEN it is used, and when a batch is created twice
    shutdown = capture(lambda: victim.execute("SELECT 1"))
    victim.close()
    conn.execute("""INSERT INTO "BatchLocks" ("BatchId") VALUES ('A')""")
    duplicate = capture(
        lambda: conn.execute("""INSERT INTO "BatchLocks" ("BatchId") VALUES ('A')""")
    )

    # THEN the shutdown is worth a retry and the duplicate never is
    assert is_transient(shutdown)
    assert isinstance(duplicate, errors.UniqueViolation)
    assert not is_transient(duplicate)


# --------------------------------------------------------------------- retrying


class FailingStep:
    """A database step that raises the given errors, one per call, then returns."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def test_transient_errors_are_retried_until_the_step_succeeds():
    # GIVEN a step that meets a serialization failure, then a deadlock
    step = FailingStep(errors.SerializationFailure("x"), errors.DeadlockDetected("y"))
    seen: list[str] = []

    # WHEN it is run with retries
    result = retrying(step, on_retry=lambda error: seen.append(type(error).__name__))

    # THEN it succeeds on the third call, the caller told of each retry
    assert (result, step.calls) == ("done", 3)
    assert seen == ["SerializationFailure", "DeadlockDetected"]


def test_permanent_errors_are_not_retried():
    # GIVEN a step that meets a unique violation
    step = FailingStep(errors.UniqueViolation("duplicate"))

    # WHEN it is run with retries
    # THEN the error is raised after the first call
    with pytest.raises(errors.UniqueViolation):
        retrying(step)
    assert step.calls == 1


def test_retries_are_bounded_and_the_last_error_raised():
    # GIVEN a step that keeps meeting serialization failures
    step = FailingStep(*[errors.SerializationFailure("again")] * 10)

    # WHEN it is run with three attempts
    # THEN the last failure is raised after the third call
    with pytest.raises(errors.SerializationFailure):
        retrying(step, attempts=3)
    assert step.calls == 3


def test_an_unreachable_server_becomes_database_unavailable():
    # GIVEN a step whose connection is always refused
    step = FailingStep(*[psycopg.OperationalError("connection refused")] * 10)

    # WHEN it is run with retries
    # THEN the caller gets DatabaseUnavailable, with the driver's error as its cause
    with pytest.raises(DatabaseUnavailable) as raised:
        retrying(step, attempts=2)
    assert step.calls == 2
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)
