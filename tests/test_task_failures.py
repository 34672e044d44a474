"""A failing task stays at the head of its batch, to be retried later; bad settings."""

import json

import pytest

from queue_core import (
    ConfigurationError,
    ConnectionHolder,
    Outcome,
    Settings,
    Worker,
    enqueue_many,
)
from queue_core.processor import load_processor
from queue_core.validation import whole_number
from tests.support import db
from tests.support.events import load_event
from tests.support.lambda_context import LambdaContext
from tests.support.processors import read_records


@pytest.fixture
def failing_handler(handler_app, monkeypatch):
    monkeypatch.setenv("TASK_PROCESSOR", "tests.support.processors:record_or_fail")
    monkeypatch.setenv("RETRY_BASE_SECONDS", "60")
    return handler_app


def test_failing_task_is_reported_and_kept_at_the_head(
    failing_handler, conn, records_file
):
    # GIVEN batch A whose head says {"fail": true}, then a good task
    ids = enqueue_many(conn, [("A", {"fail": True}), ("A", {"n": 1})])

    # WHEN POST /process-task works A
    response = failing_handler.lambda_handler(
        load_event("function-url-process-task"), LambdaContext(60)
    )

    # THEN the answer is still 200, reporting the failed task and its error
    assert response["statusCode"] == 200
    report = json.loads(response["body"])
    assert report["outcome"] == "task_failed"
    assert report["failedTaskId"] == ids[0]
    assert report["error"].startswith("RuntimeError: ")

    # AND the task is kept with its error and a retry time a minute or so away
    head = db.task(conn, ids[0])
    assert head["LastError"] == report["error"]
    assert conn.execute(
        "SELECT \"NotBefore\" > statement_timestamp() + interval '20 seconds'"
        ' FROM "Tasks" WHERE "Id" = %s',
        (ids[0],),
    ).fetchone()[0]

    # AND the next task was not started, the lease was given back
    assert [(r["event"], r["task_id"]) for r in read_records(records_file)] == [
        ("start", ids[0]),
        ("fail", ids[0]),
    ]
    assert db.task(conn, ids[1])["Attempts"] == 0
    assert db.lease(conn, "A")["LockedBy"] is None

    # WHEN another worker comes before the retry time
    again = failing_handler.lambda_handler(
        load_event("direct-invoke"), LambdaContext(60)
    )

    # THEN A is not claimable yet
    assert again["outcome"] == "no_work"
    assert db.pending_ids(conn) == ids


def test_default_processor_simulates_work(handler_app, conn, monkeypatch):
    # GIVEN the default processor, with a very short simulated task
    monkeypatch.delenv("TASK_PROCESSOR")
    monkeypatch.setenv("SIMULATED_TASK_SECONDS", "0.01-0.02")
    ids = enqueue_many(conn, [("C", {}), ("C", {})])

    # WHEN the function is invoked directly for C
    report = handler_app.lambda_handler(load_event("direct-invoke"), LambdaContext(60))

    # THEN the batch is worked
    assert report["completed"] == ids


@pytest.mark.parametrize(
    "spec",
    ["no_colon", "tests.support.processors:missing", "no.such.module:run", ":run"],
)
def test_unloadable_processor_is_a_configuration_error(spec):
    # WHEN a TASK_PROCESSOR that cannot be loaded is asked for
    # THEN the error is a configuration error naming the setting
    with pytest.raises(ConfigurationError, match="TASK_PROCESSOR"):
        load_processor(spec)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEASE_TIMEOUT_SECONDS", "soon"),
        ("LEASE_TIMEOUT_SECONDS", "0"),
        ("TASK_BUDGET_SECONDS", "-1"),
        ("SAFETY_MARGIN_SECONDS", "nan?"),
    ],
)
def test_bad_setting_is_refused_naming_it(name, value):
    # WHEN a setting is not a positive number
    # THEN reading the settings fails, naming it
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_env({"DATABASE_URL": "postgresql:///x", name: value})


def test_settings_without_database_url_are_refused():
    # WHEN DATABASE_URL is missing
    # THEN reading the settings fails, naming it
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        Settings.from_env({"LEASE_TIMEOUT_SECONDS": "2"})


def test_settings_are_read_from_the_environment():
    # WHEN settings are read from an environment
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql:///x",
            "LEASE_TIMEOUT_SECONDS": "2",
            "TASK_BUDGET_SECONDS": "0.5",
            "SAFETY_MARGIN_SECONDS": "0.25",
            "TASK_PROCESSOR": "tests.support.processors:record",
        }
    )

    # THEN each value is taken, and the URL (with its password) stays out of repr()
    assert (settings.lease_seconds, settings.task_budget_seconds) == (2.0, 0.5)
    assert settings.safety_margin_seconds == 0.25
    assert settings.task_processor == "tests.support.processors:record"
    assert "postgresql" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("MAX_PAYLOAD_BYTES", "0.5", "whole number"),
        ("MAX_CONCURRENCY", "2.5", "whole number"),
        ("MAX_CONCURRENCY", "\u00b2", "whole number"),  # a digit to str.isdigit()
        ("MAX_PAYLOAD_BYTES", "\u0663\u0660\u0660", "whole number"),  # Arabic-Indic
        ("LEASE_TIMEOUT_SECONDS", "inf", "LEASE_TIMEOUT_SECONDS"),
        ("SAFETY_MARGIN_SECONDS", "nan", "SAFETY_MARGIN_SECONDS"),
    ],
)
def test_malformed_numeric_settings_are_refused_by_name(name, value, rule):
    # WHEN a setting is not a number of the kind it must be
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"DATABASE_URL": "postgresql:///x", name: value})

    # THEN the error names the setting and its rule
    assert name in str(refused.value) and rule in str(refused.value)


def test_fractional_connect_timeout_rounds_up_never_to_zero():
    # GIVEN half a second (libpq would read 0 as "wait forever")
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql:///x", "CONNECT_TIMEOUT_SECONDS": "0.5"}
    )

    # THEN the connection timeout is one whole second
    assert settings.connect_timeout_seconds == 1


def test_failure_is_recorded_even_when_the_session_died_while_the_processor_ran(
    db_url, conn
):
    # GIVEN a task whose processor loses the worker's database session, then fails
    (task_id,) = enqueue_many(conn, [("A", {})])
    holder = ConnectionHolder(db_url)
    settings = db.settings(db_url, RETRY_BASE_SECONDS=60)

    def cut_off_then_fail(task):
        pid = holder.get().info.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        raise ValueError("the processor's own error")

    # WHEN the worker runs it
    report = Worker(holder, settings, processor=cut_off_then_fail).run("w1")
    holder.discard()

    # THEN the processor's error is recorded, with its backoff, on a new session
    assert report.outcome == Outcome.TASK_FAILED
    assert report.failed_task_id == task_id
    row = db.task(conn, task_id)
    assert row["LastError"] == "ValueError: the processor's own error"
    assert row["NotBefore"] is not None
    assert row["Attempts"] == 1


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("7", 7),
        ("007", 7),
        ("9223372036854775807", 2**63 - 1),  # the largest task id
        ("9223372036854775808", None),
        ("+5", None),
        ("1_000", None),
        ("\u00b2", None),
        ("", None),
    ],
)
def test_whole_numbers_are_ascii_digits_up_to_bigint(raw, value):
    assert whole_number(raw) == value
