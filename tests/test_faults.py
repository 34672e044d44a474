"""Workers that die, freeze or lose their connection at any step, in separate processes
with real signals and real connection kills: the batch is worked again once the lease
expires, nothing is lost, and at most the task in flight is processed again."""

import collections
import signal
import time

import pytest

from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many
from tests.support import db
from tests.support.fault_worker import FaultWorkers
from tests.support.processors import read_records, record

LEASE_SECONDS = 2
TICK_SECONDS = 0.2


@pytest.fixture
def fault_workers(tmp_path, db_url, records_file):
    workers = FaultWorkers(
        tmp_path, db_url, records_file, LEASE_TIMEOUT_SECONDS=str(LEASE_SECONDS)
    )
    try:
        yield workers
    finally:
        workers.stop_all()


def starts(records_file, batch_id: str | None = None) -> list[tuple[int, int, int]]:
    """(task id, attempt, pid) of every start of a task, in the order they happened."""
    return [
        (r["task_id"], r["attempt"], r["pid"])
        for r in read_records(records_file)
        if r["event"] == "start" and batch_id in (None, r["batch_id"])
    ]


def work_every_tick(conn, worker: Worker, batch_id: str, timeout: float = 60):
    """Run worker once a tick until the batch is empty, as a schedule would.

    Every run that begins after the batch's lease has expired must claim the batch:
    the batch is worked again within the lease timeout plus one tick.
    """
    reports = []
    deadline = time.monotonic() + timeout
    while db.pending_ids(conn, batch_id):
        assert time.monotonic() < deadline, f"batch {batch_id} not drained: {reports}"
        lease = db.lease(conn, batch_id)
        claimable = lease["LockedBy"] is None or db.lease_expired(
            conn, batch_id, LEASE_SECONDS
        )
        report = worker.run("survivor", preferred_batch_id=batch_id)
        reports.append(report)
        if claimable:
            assert report.batch_id == batch_id, (report, lease)
        time.sleep(TICK_SECONDS)
    return reports


# ---------------------------------------------------------------- killed at any step


IN_FLIGHT = {
    # point: how many times each task (by position) is started, in all
    "after_claim": [1, 1, 1],  # the claim counted a start of the head, nothing ran
    "mid_task": [2, 1, 1],  # the head was running: it runs again, once
    "after_complete": [1, 1, 1],  # the head was done and deleted; the next not begun
}


@pytest.mark.slow
@pytest.mark.parametrize("point", IN_FLIGHT)
def test_worker_killed_at_any_step_leaves_its_batch_to_the_next_owner(
    conn, db_url, records_file, fault_workers, point
):
    # GIVEN batch B with three tasks
    b_ids = enqueue_many(conn, [("B", {"n": n}) for n in range(3)])

    # AND a worker process with a short lease, stopped at the step
    victim = fault_workers.start(point, batch="B")
    fault_workers.wait_at(victim, point)
    assert db.lease(conn, "B")["LockedBy"] == victim.worker_id

    # WHEN it is killed there with SIGKILL
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    # THEN nothing of B is lost: what it did not commit is still pending
    done_by_victim = 1 if point == "after_complete" else 0
    assert db.pending_ids(conn, "B") == b_ids[done_by_victim:]

    # WHEN a survivor works B every tick
    survivor = Worker(
        ConnectionHolder(db_url),
        db.settings(db_url, LEASE_TIMEOUT_SECONDS=LEASE_SECONDS),
        record,
    )
    reports = work_every_tick(conn, survivor, "B")

    # THEN it took B over from the victim, as soon as the lease had expired
    takeovers = [report.taken_over_from for report in reports if report.batch_id]
    assert takeovers[0] == victim.worker_id

    # AND worked the rest in order: the task in flight once more, no other twice
    survivor_starts = [
        task_id for task_id, _, pid in starts(records_file) if pid != victim.pid
    ]
    assert survivor_starts == b_ids[done_by_victim:]
    counts = collections.Counter(task_id for task_id, _, _ in starts(records_file, "B"))
    assert [counts[task_id] for task_id in b_ids] == IN_FLIGHT[point]
    assert db.pending_ids(conn) == []


# ---------------------------------------------------------------- frozen past the lease


@pytest.mark.slow
@pytest.mark.parametrize("session_options", ["on", "off"])
def test_frozen_worker_is_cut_off_by_the_server_and_disturbs_no_one_when_it_wakes(
    conn, db_url, records_file, fault_workers, session_options
):
    if conn.info.server_version < 170000:
        pytest.skip(
            "needs transaction_timeout (PostgreSQL 17+): on older servers nothing ends "
            "the transaction of a worker frozen after a pipeline"
        )

    # GIVEN batch B with three tasks
    b_ids = enqueue_many(conn, [("B", {"n": n}) for n in range(3)])

    # AND a worker process frozen (SIGSTOP) in the middle of B's head, whose session
    # the server ends once its transaction has lasted 2 s (the bound set at connection,
    # or, without startup options, by the transaction itself)
    victim = fault_workers.start(
        "mid_task",
        batch="B",
        TRANSACTION_TIMEOUT_SECONDS="2",
        DB_SESSION_OPTIONS=session_options,
    )
    fault_workers.wait_at(victim, "mid_task")
    victim.send_signal(signal.SIGSTOP)

    # WHEN the server has rolled its transaction back and closed its session
    db.wait_until(
        lambda: (
            not conn.execute(
                "SELECT EXISTS (SELECT FROM pg_stat_activity"
                " WHERE application_name = 'fault-worker'"
                " AND datname = current_database())"
            ).fetchone()[0]
        ),
        timeout=60,
        what="the server to end the frozen worker's session",
    )

    # THEN a new owner takes B over and works it all, the head again as attempt 2
    survivor = Worker(
        ConnectionHolder(db_url),
        db.settings(db_url, LEASE_TIMEOUT_SECONDS=LEASE_SECONDS),
        record,
    )
    reports = work_every_tick(conn, survivor, "B")
    completed = [(t.task_id, t.attempt) for r in reports for t in r.completed]
    assert completed == [(b_ids[0], 2), (b_ids[1], 1), (b_ids[2], 1)]
    after_new_owner = db.table_state(conn)

    # WHEN the frozen worker wakes up and finishes its task
    victim.send_signal(signal.SIGCONT)
    late = fault_workers.let_go(victim)

    # THEN none of its writes changed anything, and it stopped (the server had ended
    # its transaction and session: a database error, its lease long gone)
    assert late["outcome"] == "database_error"
    assert late["completed"] == []
    assert db.table_state(conn) == after_new_owner

    # AND only the task it had in flight was processed twice
    counts = collections.Counter(task_id for task_id, _, _ in starts(records_file))
    assert [counts[task_id] for task_id in b_ids] == [2, 1, 1]


@pytest.mark.slow
def test_frozen_owner_holding_the_head_makes_the_next_owner_back_off(
    conn, db_url, records_file, fault_workers
):
    # GIVEN a worker process frozen in B's head long past its lease, its session kept
    b_ids = enqueue_many(conn, [("B", {"n": n}) for n in range(2)])
    victim = fault_workers.start(
        "mid_task", batch="B", TRANSACTION_TIMEOUT_SECONDS="300"
    )
    fault_workers.wait_at(victim, "mid_task")
    victim.send_signal(signal.SIGSTOP)
    db.wait_until(
        lambda: db.lease_expired(conn, "B", LEASE_SECONDS),
        timeout=30,
        what="the lease to expire",
    )

    # WHEN other workers come, again and again
    holder = ConnectionHolder(db_url)
    other = Worker(
        holder, db.settings(db_url, LEASE_TIMEOUT_SECONDS=LEASE_SECONDS), record
    )
    reports = [other.run(f"other-{n}", preferred_batch_id="B") for n in range(3)]

    # THEN each backs off: B's next task is never started in the head's place
    assert [report.outcome for report in reports] == [Outcome.BATCH_BUSY] * 3
    assert db.task(conn, b_ids[1])["Attempts"] == 0
    assert [task_id for task_id, _, _ in starts(records_file)] == [b_ids[0]]

    # WHEN the frozen worker wakes and tries to finish
    victim.send_signal(signal.SIGCONT)
    late = fault_workers.let_go(victim)

    # THEN its lease was lost: it completed nothing, and B is then worked in order
    assert (late["outcome"], late["completed"]) == ("lease_lost", [])
    report = other.run("other-last", preferred_batch_id="B")
    assert [t.task_id for t in report.completed] == b_ids
    holder.discard()


# ---------------------------------------------------------------- connection killed


@pytest.mark.slow
def test_connection_killed_mid_run_loses_nothing(conn, worker_processes, records_file):
    # GIVEN batches A and B of tasks that take a moment each
    ids = enqueue_many(conn, [(batch, {"n": n}) for n in range(4) for batch in "AB"])

    # AND a Lambda worker process working the queue until it is empty
    worker = worker_processes.start(
        "--events",
        "schedule-default",
        "--until-empty",
        env={"RECORD_SLEEP_SECONDS": "0.3", "LEASE_TIMEOUT_SECONDS": "2"},
    )
    db.wait_until(
        lambda: starts(records_file), timeout=60, what="the worker to start a task"
    )

    # WHEN the server ends its session mid-task (pg_terminate_backend)
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'task-queue-worker'"
        " AND datname = current_database()"
    ).fetchone()[0]
    assert killed == 1

    # THEN the worker goes on, on a new connection, until the queue is empty
    assert worker_processes.wait(worker, timeout=90) == 0, worker_processes.output(
        worker
    )
    assert db.pending_ids(conn) == []

    # AND every task was completed once; only the one in flight was started twice
    reports = read_records(worker_processes.reports_file)
    completed = [task_id for report in reports for task_id in report["completed"]]
    assert sorted(completed) == sorted(ids)
    counts = collections.Counter(task_id for task_id, _, _ in starts(records_file))
    assert sum(count - 1 for count in counts.values()) <= 1

    # AND within each batch, tasks finished in "Id" order
    for batch in "AB":
        ends = [
            r["task_id"]
            for r in read_records(records_file)
            if r["event"] == "end" and r["batch_id"] == batch
        ]
        assert ends == sorted(ends)


# ---------------------------------------------------------------- a task that kills


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["dead-letter", "halt"])
def test_task_that_kills_its_worker_every_time_is_given_up_after_max_attempts(
    conn, worker_processes, records_file, policy
):
    # GIVEN batch C whose head kills the worker process that starts it, then a task
    c_ids = enqueue_many(conn, [("C", {"die": True}), ("C", {"n": 1})])
    env = {
        "TASK_PROCESSOR": "tests.support.processors:record_or_die",
        "LEASE_TIMEOUT_SECONDS": "1",
        "MAX_ATTEMPTS": "2",
        "ON_EXHAUSTED": policy,
    }

    # WHEN Lambda workers for C come one after another, each dying at the head
    for _ in range(2):
        victim = worker_processes.start("--events", "direct-invoke", env=env)
        assert worker_processes.wait(victim, timeout=60) == -signal.SIGKILL
        db.wait_until(
            lambda: db.lease_expired(conn, "C", 1), timeout=30, what="lease expiry"
        )
    assert db.task(conn, c_ids[0])["Attempts"] == 2

    # AND one more comes after the second death
    last = worker_processes.start("--events", "direct-invoke", env=env)
    assert worker_processes.wait(last, timeout=60) == 0, worker_processes.output(last)
    (report,) = read_records(worker_processes.reports_file)
    log_lines = (worker_processes.directory / f"worker-{last.number}.out").read_text()

    # THEN its claim did not start the head a third time: it applied the policy
    starts_of_head = [s for s in starts(records_file) if s[0] == c_ids[0]]
    assert [attempt for _, attempt, _ in starts_of_head] == [1, 2]
    if policy == "dead-letter":
        # the head went to the dead letters, and the batch went on
        assert report["deadLettered"] == [c_ids[0]]
        assert report["completed"] == [c_ids[1]]
        reason = conn.execute(
            'SELECT "Reason", "Attempts" FROM "DeadLetters" WHERE "Id" = %s',
            (c_ids[0],),
        ).fetchone()
        assert reason == ("abandoned", 2)
        assert '"action":"task_dead_lettered"' in log_lines.replace(" ", "")
        assert db.pending_ids(conn) == []
    else:
        # the batch halted, its tasks kept, nothing started
        assert report["haltedBatches"] == ["C"]
        assert report["completed"] == []
        assert db.lease(conn, "C")["HaltedAt"] is not None
        assert '"action":"batch_halted"' in log_lines.replace(" ", "")
        assert db.pending_ids(conn) == c_ids
        assert db.task(conn, c_ids[1])["Attempts"] == 0
