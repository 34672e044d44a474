"""The command line, python -m queue_core: migrate, enqueue, stats, leases, and the
surface shared by every command (output, exit codes). The operator actions of issue 3
(dead, resume, cancel, policy) are tested in test_operations.py."""

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


def run_json(*args: str, database_url: str) -> dict:
    result = cli(*args, "--json", database_url=database_url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
    "payload an integer of 5000 digits": (
        ["--batch", "A", "--payload", "9" * 5000],
        "--payload: must not hold a number of over 4,300 digits",
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
    assert result.returncode == 3
    assert result.stderr.startswith("error: database unreachable: ")
    assert password not in result.stderr + result.stdout


def test_missing_database_url_exits_2_with_a_clear_message():
    result = cli("enqueue", "--batch", "A", database_url=None)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: DATABASE_URL is not set"


def test_unreachable_database_exits_3_with_a_clear_message(tmp_path):
    result = cli(
        "migrate", database_url=f"postgresql://postgres@/postgres?host={tmp_path}"
    )
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: database unreachable: ")
    assert len(result.stderr.strip().splitlines()) == 1


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


def test_stats_shows_a_failed_head_as_blocked(db_url, conn):
    # GIVEN batch A whose head failed and waits for its retry, and a healthy batch B
    from queue_core import enqueue_many
    from queue_core.lease import claim_batch
    from queue_core.queries import query

    head, _ = enqueue_many(conn, [("A", {}), ("A", {}), ("B", {})])[:2]
    lease = claim_batch(conn, "worker-1", 300, preferred_batch_id="A").lease
    conn.execute(
        query("record_failure"),
        {
            "batch_id": "A",
            "fencing_token": lease.fencing_token,
            "lease_seconds": 300,
            "task_id": head,
            "error": "RuntimeError: boom",
            "retry_delay_seconds": 600,
            "max_attempts": 5,
            "on_exhausted": "dead-letter",
        },
    )

    # WHEN stats runs, for scripts and for people
    document = json.loads(cli("stats", "--json", database_url=db_url).stdout)
    text = cli("stats", database_url=db_url).stdout

    # THEN A is blocked behind its head, with the error and the retry time
    batches = {b["batchId"]: b for b in document["batches"]}
    assert batches["A"]["blocked"] is True
    assert (batches["A"]["headTaskId"], batches["A"]["headAttempts"]) == (head, 1)
    assert batches["A"]["headLastError"] == "RuntimeError: boom"
    assert batches["A"]["headRetryAt"] is not None
    assert batches["B"]["blocked"] is False
    line_a = next(line for line in text.splitlines() if line.startswith("A "))
    assert f"yes: head {head} failed 1x, retry at" in line_a

    # AND one batch can be asked for, and an unknown one is an error
    one = json.loads(cli("stats", "--batch", "B", "--json", database_url=db_url).stdout)
    assert [b["batchId"] for b in one["batches"]] == ["B"]
    missing = cli("stats", "--batch", "Z", database_url=db_url)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: batch 'Z' does not exist"


# ----------------------------------------------------------------------- leases


def test_leases_lists_held_leases_and_all_with_all(db_url, conn):
    from queue_core import enqueue_many
    from queue_core.lease import claim_batch

    enqueue_many(conn, [("A", {}), ("A", {}), ("B", {})])
    claim_batch(conn, "worker-1", 300, preferred_batch_id="A")

    held = json.loads(cli("leases", "--json", database_url=db_url).stdout)
    every = json.loads(
        cli("leases", "list", "--all", "--json", database_url=db_url).stdout
    )
    text = cli("leases", database_url=db_url).stdout.splitlines()

    assert [(x["batchId"], x["owner"], x["pending"]) for x in held["leases"]] == [
        ("A", "worker-1", 2)
    ]
    assert held["leases"][0]["expired"] is False
    assert [x["batchId"] for x in every["leases"]] == ["A", "B"]
    assert text[0].split() == [
        "BATCH",
        "OWNER",
        "TOKEN",
        "EXPIRES",
        "PENDING",
        "HEAD",
        "ATTEMPTS",
        "DEAD",
        "HALTED",
    ]
    assert text[1].split()[:3] == ["A", "worker-1", "1"]


def test_release_fences_the_owner_and_never_lets_the_head_run_twice(db_url, conn):
    from queue_core import enqueue_many
    from queue_core.lease import claim_batch
    from queue_core.queries import query

    # GIVEN worker-1 owns batch A and is processing its head (the row is locked)
    first, _second = enqueue_many(conn, [("A", {}), ("A", {})])
    lease = claim_batch(conn, "worker-1", 300, preferred_batch_id="A").lease
    params = {
        "batch_id": "A",
        "fencing_token": lease.fencing_token,
        "lease_seconds": 300,
        "max_attempts": 5,
    }
    with psycopg.connect(db_url, autocommit=True) as worker_1:
        worker_1.execute("BEGIN")
        assert worker_1.execute(query("lock_head"), params).fetchone()[1] == first

        # WHEN an operator releases the lease
        result = cli("leases", "release", "A", "--json", database_url=db_url)

        # THEN it is released at once, naming the former owner and the new token
        assert result.returncode == 0, result.stderr
        released = json.loads(result.stdout)
        assert released == {
            "batchId": "A",
            "previousOwner": "worker-1",
            "fencingToken": lease.fencing_token + 1,
        }

        # AND while worker-1 still holds the head, nobody else starts it
        assert claim_batch(conn, "worker-2", 300).lease is None

        # AND worker-1 can no longer complete it
        done = worker_1.execute(
            query("complete_task"), {**params, "task_id": first, "keep_lease": True}
        ).fetchone()
        assert done[:2] == (0, 0)
        worker_1.execute("ROLLBACK")

    # AND once worker-1's transaction is gone, the next owner starts from the head
    lease_2 = claim_batch(conn, "worker-2", 300).lease
    assert lease_2.batch_id == "A"
    assert lease_2.fencing_token == lease.fencing_token + 2
    assert db.pending_ids(conn, "A")[0] == first


def test_release_refusals_exit_1_with_the_reason(db_url, conn):
    from queue_core import enqueue_many
    from queue_core.lease import claim_batch

    enqueue_many(conn, [("A", {}), ("B", {})])
    claim_batch(conn, "worker-1", 300, preferred_batch_id="A")
    before = db.table_state(conn)

    wrong_owner = cli("leases", "release", "A", "--owner", "w-9", database_url=db_url)
    free = cli("leases", "release", "B", database_url=db_url)
    unknown = cli("leases", "release", "Z", database_url=db_url)
    bad_name = cli("leases", "release", "a b", database_url=db_url)

    assert (wrong_owner.returncode, wrong_owner.stderr.strip()) == (
        1,
        "error: the lease of batch 'A' is held by 'worker-1', not 'w-9'",
    )
    assert (free.returncode, free.stderr.strip()) == (
        1,
        "error: the lease of batch 'B' is not held",
    )
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1,
        "error: batch 'Z' does not exist",
    )
    assert bad_name.returncode == 2
    assert "batch" in bad_name.stderr
    assert db.table_state(conn) == before

    # AND with the right owner named, it goes through
    right = cli("leases", "release", "A", "--owner", "worker-1", database_url=db_url)
    assert right.returncode == 0, right.stderr
    assert "released the lease of batch 'A'" in right.stdout


# ------------------------------------------------------------ halts, dead letters


def test_stats_and_leases_show_a_halted_batch_and_dead_letters(db_url, conn):
    # GIVEN batch H, halted by its own policy when its head failed its only attempt,
    # and batch C cancelled: its two tasks are dead letters
    from queue_core import enqueue_many, operations
    from queue_core.lease import claim_batch
    from queue_core.queries import query

    (head,) = enqueue_many(conn, [("H", {})])
    enqueue_many(conn, [("C", {}), ("C", {})])
    operations.set_batch_policy(conn, "H", max_attempts=1, on_exhausted="halt")
    lease = claim_batch(conn, "worker-1", 300, preferred_batch_id="H").lease
    conn.execute(
        query("record_failure"),
        {
            "batch_id": "H",
            "fencing_token": lease.fencing_token,
            "lease_seconds": 300,
            "task_id": head,
            "error": "RuntimeError: boom",
            "retry_delay_seconds": 600,
            "max_attempts": 5,
            "on_exhausted": "dead-letter",
        },
    )
    assert cli("cancel", "C", database_url=db_url).returncode == 0

    # WHEN stats runs
    stats = run_json("stats", database_url=db_url)["batches"]
    text = cli("stats", database_url=db_url).stdout

    # THEN H is blocked because it is halted, and says why; C shows its dead letters
    batches = {b["batchId"]: b for b in stats}
    assert (batches["H"]["blocked"], batches["H"]["halted"]) == (True, True)
    assert batches["H"]["haltReason"].startswith(f"task {head}: ")
    assert "RuntimeError: boom" in batches["H"]["haltReason"]
    assert (batches["C"]["blocked"], batches["C"]["deadLetters"]) == (False, 2)
    line_h = next(line for line in text.splitlines() if line.startswith("H "))
    assert f"yes: halted: task {head}: " in line_h

    # AND leases shows the halt, the head's attempts and the dead letters too
    (h_lease,) = run_json("leases", "--batch", "H", database_url=db_url)["leases"]
    assert (h_lease["owner"], h_lease["halted"], h_lease["deadLetters"]) == (
        None,
        True,
        0,
    )
    assert (h_lease["headTaskId"], h_lease["headAttempts"]) == (head, 1)
    assert (h_lease["maxAttempts"], h_lease["onExhausted"]) == (1, "halt")
    every = cli("leases", "--all", database_url=db_url).stdout.splitlines()
    lines = {line.split()[0]: line for line in every[1:]}
    assert f"yes: task {head}: " in lines["H"]
    assert lines["C"].split()[-2:] == ["2", "no"]
    missing = cli("leases", "--batch", "Z", database_url=db_url)
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "error: batch 'Z' does not exist",
    )

    # WHEN H is resumed (--json before the command)
    resumed = cli("--json", "resume", "H", database_url=db_url)
    assert json.loads(resumed.stdout)["wasHalted"] is True

    # THEN it is no longer blocked: its head has a fresh set of attempts, and its
    # last error is kept for the record
    (after,) = run_json("stats", "--batch", "H", database_url=db_url)["batches"]
    assert (after["blocked"], after["halted"], after["headAttempts"]) == (
        False,
        False,
        0,
    )
    assert after["headLastError"] == "RuntimeError: boom"


# ----------------------------------------------------------------------- output


def test_json_output_is_only_the_document_even_with_logs(db_url):
    # WHEN --json is given before the command, with INFO logs asked for
    result = cli("--json", "--verbose", "enqueue", "--batch", "A", database_url=db_url)

    # THEN standard output parses as one JSON document, and the logs are elsewhere
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)) == ["ids"]


def test_empty_queue_reads_clearly(db_url):
    assert cli("stats", database_url=db_url).stdout.strip() == "no batches"
    assert cli("leases", database_url=db_url).stdout.strip() == "no lease is held"
    assert json.loads(cli("stats", "--json", database_url=db_url).stdout) == {
        "batches": []
    }


def test_unmigrated_database_says_to_migrate(empty_db_url):
    result = cli("stats", database_url=empty_db_url)
    assert result.returncode == 1
    assert "queue-core migrate" in result.stderr
    assert "Traceback" not in result.stderr


BAD_FILES = {
    "unknown field": ('{"batchId": "A", "paylod": {}}\n', "line 1", "paylod"),
    "not UTF-8": (b'{"batchId": "\xff"}\n', "line 1", "UTF-8"),
    "empty": ("\n\n", "--file", "holds no task"),
}


@pytest.mark.parametrize(
    ("content", "field", "rule"), BAD_FILES.values(), ids=BAD_FILES.keys()
)
def test_bad_task_files_exit_2(db_url, conn, tmp_path, content, field, rule):
    path = tmp_path / "tasks.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)

    result = cli("enqueue", "--file", str(path), database_url=db_url)

    assert result.returncode == 2
    assert field in result.stderr and rule in result.stderr
    assert db.table_state(conn) == {"tasks": [], "leases": []}


def test_file_cannot_be_combined_with_batch_or_be_missing(db_url, tmp_path):
    combined = cli("enqueue", "--file", "-", "--batch", "A", database_url=db_url)
    missing = cli("enqueue", "--file", str(tmp_path / "nope"), database_url=db_url)

    assert combined.returncode == 2 and "cannot be combined" in combined.stderr
    assert missing.returncode == 2 and "cannot be read" in missing.stderr


def test_usage_errors_exit_2():
    result = cli("leases", "release", database_url="postgresql:///unused")
    assert result.returncode == 2
    assert "BATCH" in result.stderr


def test_make_cli_runs_against_the_given_database(db_url, conn):
    # GIVEN a task, and DATABASE_URL naming the test's database
    from queue_core import enqueue_many

    enqueue_many(conn, [("A", {})])

    # WHEN the Makefile's front door is used
    result = subprocess.run(
        ["make", "--no-print-directory", "cli", "ARGS=stats --json"],
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=120,
    )

    # THEN standard output is the JSON document alone
    assert result.returncode == 0, result.stderr
    assert [b["batchId"] for b in json.loads(result.stdout)["batches"]] == ["A"]


def test_malformed_database_url_is_a_configuration_error(tmp_path):
    # WHEN DATABASE_URL cannot even be parsed
    result = subprocess.run(
        [sys.executable, "-m", "queue_core", "stats"],
        env={**os.environ, "DATABASE_URL": "not a url at all", "PYTHONPATH": "src"},
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )

    # THEN it exits 2 (bad configuration) with one line naming the setting
    assert result.returncode == 2
    assert result.stderr.startswith("error: DATABASE_URL is malformed")
