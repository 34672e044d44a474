"""make invoke: lambda_handler run in-process on an event file, the stand-in for
`sam local invoke` without Docker (src/localdev/invoke.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from queue_core import enqueue_many

REPO_ROOT = Path(__file__).resolve().parents[1]


def environment(database_url: str, records_file: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
        "DATABASE_URL": database_url,
        "TASK_PROCESSOR": "tests.support.processors:record",
        "RECORD_FILE": str(records_file),
        "RECORD_SLEEP_SECONDS": "0",
    }


def invoke(event: str, database_url: str, records_file: Path, *args: str):
    return subprocess.run(
        [sys.executable, "-m", "localdev.invoke", event, *args],
        cwd=REPO_ROOT,
        env=environment(database_url, records_file),
        capture_output=True,
        text=True,
        timeout=120,
    )


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_invoke_migrates_then_runs_the_handler_on_the_event(empty_db_url, records_file):
    # GIVEN a database without the queue's schema
    # WHEN the scheduled event is invoked on it
    first = invoke("events/schedule-default.json", empty_db_url, records_file)

    # THEN the schema was created first, and the handler found no work
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["outcome"] == "no_work"
    assert "applied migrations: 0001" in first.stderr

    # GIVEN then a task in batch C
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        (task_id,) = enqueue_many(conn, [("C", {"n": 1})])

    # WHEN the direct-invoke event (which prefers batch C) is invoked
    second = invoke("events/direct-invoke.json", empty_db_url, records_file)

    # THEN standard output holds the response alone
    assert second.returncode == 0, second.stderr
    response = json.loads(second.stdout)
    assert (response["outcome"], response["completed"]) == ("drained", [task_id])
    assert response["workerId"] == "manual-run-1"

    # AND standard error the structured logs and the EMF metrics, as in CloudWatch
    records = json_lines(second.stderr)
    completions = [r for r in records if r.get("action") == "task_completed"]
    assert [(r["task_id"], r["batch_id"]) for r in completions] == [(task_id, "C")]
    assert any("_aws" in record for record in records)


def test_invoke_refuses_a_missing_event_file(db_url, records_file):
    result = invoke("events/no-such-event.json", db_url, records_file)
    assert result.returncode == 2
    assert result.stderr.startswith("error: events/no-such-event.json")
    assert result.stdout == ""


def test_make_invoke_prints_the_response(db_url, records_file):
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "invoke",
            "EVENT=events/function-url-process-task.json",
        ],
        cwd=REPO_ROOT,
        env=environment(db_url, records_file),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["statusCode"] == 200
    assert json.loads(response["body"])["outcome"] == "no_work"
