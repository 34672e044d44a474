"""The command line, python -m queue_core: migrate, enqueue, stats."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from queue_core.migrations import _MIGRATION_LOCK_KEY, migration_files
from tests.support import db

REPO_ROOT = str(Path(__file__).resolve().parents[1])
ALL_VERSIONS = [path.stem for path in migration_files()]


def cli(
    *args: str,
    database_url: str | None,
    stdin: str | None = None,
    extra_env: dict[str, str] | None = None,
    **popen,
):
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([f"{REPO_ROOT}/src", REPO_ROOT]),
        **(extra_env or {}),
    }
    environment.pop("DATABASE_URL", None)
    if database_url is not None:
        environment["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "queue_core", *args],
        cwd=REPO_ROOT,
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        **popen,
    )


def applied_versions(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            'SELECT "Version" FROM "QueueMigrations" ORDER BY "Version"'
        ).fetchall()
    return [row[0] for row in rows]


# ----------------------------------------------------------------------- migrate


def test_migrate_twice_applies_each_migration_once(empty_db_url):
    # WHEN migrate runs on an empty database, then again
    first = cli("migrate", "--json", database_url=empty_db_url)
    second = cli("migrate", "--json", database_url=empty_db_url)

    # THEN the first applies every migration and the second nothing
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"applied": ALL_VERSIONS}
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"applied": []}
    assert applied_versions(empty_db_url) == ALL_VERSIONS

    # AND the text output says what happened
    third = cli("migrate", database_url=empty_db_url)
    assert third.stdout.strip() == "applied 0 migration(s)"


def test_two_migrate_processes_at_once_apply_each_migration_once(empty_db_url):
    # GIVEN the migration lock is held for a moment, so that the two runs surely meet
    with psycopg.connect(empty_db_url, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))

        # WHEN two migrate processes start together on an empty database
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "queue_core", "migrate", "--json"],
                cwd=REPO_ROOT,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([f"{REPO_ROOT}/src", REPO_ROOT]),
                    "DATABASE_URL": empty_db_url,
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        db.wait_until(
            lambda: gate.execute(
                "SELECT count(*) = 2 FROM pg_locks"
                " WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database"
                "                 WHERE datname = current_database())"
            ).fetchone()[0],
            timeout=60,
            what="both migrate processes to wait for the lock",
        )
        gate.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
    results = [process.communicate(timeout=60) for process in processes]

    # THEN both succeed, and between them each migration was applied exactly once
    assert [process.returncode for process in processes] == [0, 0], results
    applied = sorted((json.loads(stdout)["applied"] for stdout, _ in results), key=len)
    assert applied == [[], ALL_VERSIONS]
    assert applied_versions(empty_db_url) == ALL_VERSIONS


def test_migrated_schema_enforces_the_batch_name_rule(db_url, conn):
    # WHEN a task of a badly named batch is written around the queue's own checks
    # THEN the database refuses it too
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("""INSERT INTO "BatchLocks" ("BatchId") VALUES ('a b')""")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("""INSERT INTO "Tasks" ("BatchId") VALUES ('no-lease-row')""")


# ----------------------------------------------------------------------- enqueue


def test_enqueue_one_task(db_url, conn):
    # WHEN a task is enqueued from the command line
    result = cli(
        "enqueue", "--batch", "A", "--payload", '{"order": 7}', database_url=db_url
    )

    # THEN it is stored, and its id printed
    assert result.returncode == 0, result.stderr
    (task_id,) = db.pending_ids(conn)
    assert result.stdout.strip() == f"enqueued 1 task(s): ids {task_id}..{task_id}"
    assert db.task(conn, task_id)["Payload"] == {"order": 7}


def test_enqueue_json_lines_from_standard_input(db_url, conn):
    # GIVEN JSON lines of tasks, with a blank line among them
    lines = "\n".join(
        [
            '{"batchId": "A", "payload": {"n": 0}}',
            "",
            '{"batchId": "tenant-42:orders.v2", "payload": [1, 2]}',
            '{"batchId": "A"}',
        ]
    )

    # WHEN they are piped to enqueue --file - --json
    result = cli("enqueue", "--file", "-", "--json", database_url=db_url, stdin=lines)

    # THEN each is stored in order and the ids printed as JSON
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)["ids"]
    assert ids == db.pending_ids(conn)
    assert [
        (db.task(conn, i)["BatchId"], db.task(conn, i)["Payload"]) for i in ids
    ] == [("A", {"n": 0}), ("tenant-42:orders.v2", [1, 2]), ("A", None)]


BAD_ENQUEUES = {
    "bad batch name": (["--batch", "a b"], "tasks[0].batchId"),
    "batch too long": (["--batch", "a" * 65], "tasks[0].batchId"),
    "payload not JSON": (["--batch", "A", "--payload", "{order: 7}"], "--payload"),
    "payload with a NUL": (["--batch", "A", "--payload", '"\\u0000"'], "payload"),
    "no batch": (["--payload", "{}"], "--batch"),
    "SQL in the batch": (["--batch", "A';DROP TABLE x;--"], "tasks[0].batchId"),
    "payload nested too deep to parse": (
        ["--batch", "A", "--payload", "[" * 6000 + "]" * 6000],
        "--payload",
    ),
    "payload nested too deep": (
        ["--batch", "A", "--payload", "[" * 40 + "]" * 40],
        "tasks[0].payload",
    ),
    "payload not UTF-8": (
        ["--batch", "A", "--payload", os.fsdecode(b'"\xff"')],
        "tasks[0].payload",
    ),
    "payload over MAX_PAYLOAD_BYTES": (
        ["--batch", "A", "--payload", '"' + "x" * 200 + '"'],
        "tasks[0].payload: must be at most 100 bytes",
    ),
}


@pytest.mark.parametrize(
    ("args", "field"), BAD_ENQUEUES.values(), ids=BAD_ENQUEUES.keys()
)
def test_bad_enqueue_exits_2_naming_the_field(db_url, conn, args, field):
    # WHEN enqueue is given bad input (with payloads limited to 100 bytes)
    result = cli(
        "enqueue", *args, database_url=db_url, extra_env={"MAX_PAYLOAD_BYTES": "100"}
    )

    # THEN it exits 2 with one clear line naming the field, and writes nothing
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert field in result.stderr
    assert "Traceback" not in result.stderr
    assert db.table_state(conn) == {"tasks": [], "leases": []}


def test_bad_line_in_a_file_refuses_the_whole_file(db_url, conn, tmp_path):
    # GIVEN a file whose third line is not a task
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"batchId": "A"}\n{"batchId": "B"}\n["C"]\n')

    # WHEN it is enqueued
    result = cli("enqueue", "--file", str(path), database_url=db_url)

    # THEN the error names the line, and none of the file was written
    assert result.returncode == 2
    assert "line 3" in result.stderr
    assert db.table_state(conn) == {"tasks": [], "leases": []}


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b'{"batchId": "A"}\n{"batchId": "\xff"}\n', "line 2: must be valid UTF-8"),
        (
            b'{"batchId": "A", "payload": ' + b"[" * 6000 + b"]" * 6000 + b"}\n",
            "line 1",
        ),
        (b'{"batchId": "A"}\n{"batchId": "A", "payload": "\\u0000"}\n', "payload"),
        (b"{'batchId': 'A'}\n", "line 1: must be valid JSON"),
    ],
    ids=["not UTF-8", "nested too deep", "NUL", "not JSON"],
)
def test_bad_file_is_refused_whole_naming_the_line(
    db_url, conn, tmp_path, content, where
):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(content)

    result = cli("enqueue", "--file", str(path), database_url=db_url)

    assert result.returncode == 2
    assert where in result.stderr
    assert "Traceback" not in result.stderr
    assert db.table_state(conn) == {"tasks": [], "leases": []}


def test_password_never_appears_in_the_error(tmp_path):
    password = "S3cret-Pa55word"
    result = cli(
        "stats", database_url=f"postgresql://u:{password}@/q?host={tmp_path}/nowhere"
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: database: ")
    assert password not in result.stderr + result.stdout


def test_missing_database_url_exits_2_with_a_clear_message():
    result = cli("enqueue", "--batch", "A", database_url=None)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: DATABASE_URL is not set"


def test_unreachable_database_exits_with_a_clear_message(tmp_path):
    result = cli(
        "migrate", database_url=f"postgresql://postgres@/postgres?host={tmp_path}"
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


# ----------------------------------------------------------------------- stats


def test_stats_shows_pending_tasks_and_owners(db_url, conn):
    # GIVEN two tasks in A, claimed by worker-1, and one in B
    from queue_core import enqueue_many
    from queue_core.lease import claim_batch

    enqueue_many(conn, [("A", {}), ("A", {}), ("B", {})])
    claim_batch(conn, "worker-1", 300, preferred_batch_id="A")

    # WHEN stats runs
    result = cli("stats", "--json", database_url=db_url)

    # THEN it lists both batches with their pending counts and owners
    assert result.returncode == 0, result.stderr
    batches = {b["batchId"]: b for b in json.loads(result.stdout)["batches"]}
    assert (batches["A"]["pending"], batches["A"]["owner"]) == (2, "worker-1")
    assert batches["A"]["leaseExpiresAt"] is not None
    assert (batches["B"]["pending"], batches["B"]["owner"]) == (1, None)
