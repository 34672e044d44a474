"""Operator actions, on the command line and beside workers: no deadlock, no loss."""

import collections
import json
import random
import threading
import time

import psycopg
import pytest

from queue_core import ConnectionHolder, Worker, enqueue_many, operations
from queue_core.lease import claim_batch, release
from queue_core.queries import query
from tests.support import db
from tests.support.processors import read_records
from tests.test_cli import cli


def failing_worker(db_url: str, *failing: int, **env) -> Worker:
    def processor(task):
        if task.id in failing:
            raise RuntimeError(f"task {task.id} fails on purpose")

    return Worker(ConnectionHolder(db_url), db.settings(db_url, **env), processor)


def run_json(*args: str, database_url: str) -> dict:
    result = cli(*args, "--json", database_url=database_url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------- leases


def test_leases_shows_owners_halts_and_dead_letters(db_url, conn):
    # GIVEN batch A owned by worker-1, batch H halted, batch D with a dead letter
    enqueue_many(conn, [("A", {}), ("H", {}), ("H", {}), ("D", {}), ("D", {})])
    claim_batch(conn, "worker-1", 300, preferred_batch_id="A")
    operations.set_batch_policy(conn, "H", max_attempts=1, on_exhausted="halt")
    h_head, d_head = db.pending_ids(conn, "H")[0], db.pending_ids(conn, "D")[0]
    failing_worker(db_url, h_head).run("worker-2", preferred_batch_id="H")
    failing_worker(db_url, d_head, MAX_ATTEMPTS=1).run("worker-3", "D")

    # WHEN leases lists them all
    batches = {
        b["batchId"]: b
        for b in run_json("leases", "--all", database_url=db_url)["leases"]
    }

    # THEN each shows what an operator must see
    assert (batches["A"]["owner"], batches["A"]["expired"]) == ("worker-1", False)
    assert batches["H"]["halted"] is True
    assert str(h_head) in batches["H"]["haltReason"]
    assert (batches["H"]["maxAttempts"], batches["H"]["onExhausted"]) == (1, "halt")
    assert (batches["H"]["headTaskId"], batches["H"]["headAttempts"]) == (h_head, 1)
    assert (batches["D"]["deadLetters"], batches["D"]["pending"]) == (1, 1)

    # AND the text view says the same in a table
    text = cli("leases", "--all", database_url=db_url).stdout
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "worker-1" in lines["A"]
    assert f"yes: task {h_head}" in lines["H"]


def test_release_takes_the_lease_away_and_fences_off_the_old_owner(db_url, conn):
    # GIVEN batch A owned by worker-1, on a long lease
    ids = enqueue_many(conn, [("A", {}), ("A", {})])
    old = claim_batch(conn, "worker-1", 300).lease

    # WHEN an operator releases it
    answer = run_json("leases", "release", "A", database_url=db_url)

    # THEN the lease is free, and worker-1's writes now change nothing
    assert answer == {
        "batchId": "A",
        "previousOwner": "worker-1",
        "fencingToken": old.fencing_token + 1,
    }
    before = db.table_state(conn)
    stale = {
        "batch_id": "A",
        "fencing_token": old.fencing_token,
        "lease_seconds": 300,
        "max_attempts": 5,
        "on_exhausted": "dead-letter",
    }
    assert conn.execute(query("lock_head"), stale).fetchall() == []
    done = conn.execute(
        query("complete_task"), {**stale, "task_id": ids[0], "keep_lease": True}
    ).fetchone()
    assert done[:2] == (0, 0)
    assert release(conn, old) is False
    assert db.table_state(conn) == before

    # AND the batch can be claimed at once by another worker
    assert claim_batch(conn, "worker-2", 300).lease.batch_id == "A"

    # AND releasing a batch without an owner is refused, saying so
    operations.release_lease(conn, "A")
    refused = cli("leases", "release", "A", database_url=db_url)
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        "error: the lease of batch 'A' is not held",
    )


# ---------------------------------------------------------------------- dead letters


def test_dead_letters_listed_redriven_and_purged_from_the_command_line(db_url, conn):
    # GIVEN two dead letters in A and one in B
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])
    (b_id,) = enqueue_many(conn, [("B", {"n": 0})])
    worker = failing_worker(db_url, a_ids[0], a_ids[1], b_id, MAX_ATTEMPTS=1)
    for _ in range(3):
        worker.run("worker-1", preferred_batch_id="A")
    worker.run("worker-1", preferred_batch_id="B")

    # WHEN they are listed
    listed = run_json("dead", database_url=db_url)["deadLetters"]

    # THEN each shows its task, attempts, error and why it is there
    assert [(d["id"], d["batchId"], d["reason"]) for d in listed] == [
        (a_ids[0], "A", "failed"),
        (a_ids[1], "A", "failed"),
        (b_id, "B", "failed"),
    ]
    assert listed[0]["payload"] == {"n": 0}
    assert listed[0]["lastError"] == f"RuntimeError: task {a_ids[0]} fails on purpose"
    assert listed[0]["attempts"] == 1

    # WHEN A's are redriven
    redriven = run_json("dead", "--redrive", "--batch", "A", database_url=db_url)

    # THEN they are back in A, in their places; B's is still a dead letter
    assert redriven == {"redriven": {"A": a_ids[:2]}}
    assert db.pending_ids(conn, "A") == a_ids[:2]
    assert [d["id"] for d in run_json("dead", database_url=db_url)["deadLetters"]] == [
        b_id
    ]

    # WHEN a purge names no scope, THEN it is refused
    refused = cli("dead", "--purge", database_url=db_url)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --purge: ")

    # WHEN B's are purged, THEN they are gone for good
    assert run_json("dead", "--purge", "--batch", "B", database_url=db_url) == {
        "purged": [b_id]
    }
    assert operations.list_dead_letters(conn) == []


def test_resume_cancel_and_policy_from_the_command_line(db_url, conn):
    # GIVEN batch H halted at its head, and batch C with three tasks
    (h_head,) = enqueue_many(conn, [("H", {})])
    c_ids = enqueue_many(conn, [("C", {"n": n}) for n in range(3)])

    # WHEN a policy is set for H, THEN it shows, and MAX_ATTEMPTS covers the rest
    assert run_json(
        "policy",
        "H",
        "--max-attempts",
        "1",
        "--on-exhausted",
        "halt",
        database_url=db_url,
    ) == {"batchId": "H", "maxAttempts": 1, "onExhausted": "halt"}
    text = cli("policy", "H", "--max-attempts", "default", database_url=db_url)
    assert text.stdout.strip() == (
        "batch H: max attempts 5 (deployment), when exhausted halt"
    )
    operations.set_batch_policy(conn, "H", max_attempts=1)
    failing_worker(db_url, h_head).run("worker-1", preferred_batch_id="H")
    assert db.lease(conn, "H")["HaltedAt"] is not None

    # WHEN H is resumed
    resumed = run_json("resume", "H", database_url=db_url)

    # THEN it is no longer halted and its head has a fresh set of attempts
    assert resumed == {
        "batchId": "H",
        "wasHalted": True,
        "headId": h_head,
        "headHeld": False,
    }
    assert db.lease(conn, "H")["HaltedAt"] is None
    assert db.task(conn, h_head)["Attempts"] == 0

    # WHEN C is cancelled, THEN its tasks become dead letters
    cancelled = run_json("cancel", "C", database_url=db_url)
    assert cancelled == {"batchId": "C", "cancelled": c_ids, "inFlight": []}
    assert db.pending_ids(conn, "C") == []


BAD_OPERATOR_COMMANDS = {
    "unknown batch": (["resume", "Nope"], 1, "batch 'Nope' does not exist"),
    "bad batch name": (["cancel", "a b"], 2, "batchId: must be"),
    "SQL in a batch name": (["leases", "release", "A';--"], 2, "batchId: must be"),
    "max attempts zero": (["policy", "A", "--max-attempts", "0"], 2, "maxAttempts"),
    "max attempts text": (["policy", "A", "--max-attempts", "x"], 2, "--max-attempts"),
    "too many attempts": (
        ["policy", "A", "--max-attempts", "1001"],
        2,
        "maxAttempts: must be between 1 and 1000",
    ),
    "ids not numbers": (["dead", "--ids", "1,x"], 2, "--ids"),
}


@pytest.mark.parametrize(
    ("args", "status", "message"),
    BAD_OPERATOR_COMMANDS.values(),
    ids=BAD_OPERATOR_COMMANDS.keys(),
)
def test_bad_operator_command_is_refused_clearly(db_url, conn, args, status, message):
    enqueue_many(conn, [("A", {})])
    before = db.table_state(conn)

    result = cli(*args, database_url=db_url)

    assert result.returncode == status
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert db.table_state(conn) == before


# ------------------------------------------------------ operators and workers at once


@pytest.mark.slow
def test_operator_actions_while_workers_run_neither_deadlock_nor_lose_tasks(
    db_url, conn, worker_processes, records_file
):
    # GIVEN four batches of short tasks, and four Lambda workers working them
    batches = ["A", "B", "C", "D"]
    ids = enqueue_many(conn, [(b, {"n": n}) for n in range(15) for b in batches])
    env = {"RECORD_SLEEP_SECONDS": "0.02", "LEASE_TIMEOUT_SECONDS": "5"}
    for _ in range(4):
        worker_processes.start("--events", "schedule-default", "--until-empty", env=env)

    # WHEN an operator releases leases, cancels batches and redrives them, meanwhile
    chooser = random.Random(7)
    revoked, errors = [], []
    stop = threading.Event()

    def operate() -> None:
        with psycopg.connect(db_url, autocommit=True) as operator:
            while not stop.is_set():
                batch = chooser.choice(batches)
                try:
                    action = chooser.choice(["release", "cancel", "redrive"])
                    if action == "release" and operations.release_lease(
                        operator, batch
                    ):
                        revoked.append(batch)
                    elif action == "cancel":
                        operations.cancel_batch(operator, batch)
                    else:
                        operations.redrive_dead_letters(operator, batch)
                except Exception as error:  # any error fails the test below
                    errors.append(repr(error))
                time.sleep(chooser.uniform(0.01, 0.1))

    operator = threading.Thread(target=operate)
    operator.start()
    time.sleep(4)
    stop.set()
    operator.join(timeout=60)

    # AND finally puts every cancelled task back, for one more worker to finish
    operations.redrive_dead_letters(conn)
    last = worker_processes.start(
        "--events", "schedule-default", "--until-empty", env=env
    )
    assert worker_processes.wait(last, timeout=90) == 0, worker_processes.output(last)
    worker_processes.stop_all()

    # THEN no action failed, and no worker met a deadlock or any database error
    assert errors == []
    for number in range(1, 6):
        logs = (worker_processes.directory / f"worker-{number}.out").read_text()
        logs += (worker_processes.directory / f"worker-{number}.err").read_text()
        assert "Deadlock" not in logs
        assert '"action":"db_error"' not in logs.replace(" ", "")

    # AND every task was completed exactly once, none lost
    reports = read_records(worker_processes.reports_file)
    completed = [task_id for report in reports for task_id in report["completed"]]
    assert sorted(completed) == sorted(ids)
    assert operations.list_dead_letters(conn) == []

    # AND a task was processed again only where a lease was taken from its owner
    starts = collections.Counter(
        r["task_id"] for r in read_records(records_file) if r["event"] == "start"
    )
    assert sum(count - 1 for count in starts.values()) <= len(revoked)
