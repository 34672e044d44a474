"""A task that keeps failing: retried after a growing backoff while its batch waits,
then dead-lettered (its batch goes on) or its batch halted (until an operator resumes
it); dead letters put back in their original places."""

import contextlib
import logging
import threading

import pytest

from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many, operations
from tests.support import db


class Scripted:
    """A processor that fails the tasks named in failing, and records every start."""

    def __init__(self, *failing: int) -> None:
        self.failing = set(failing)
        self.seen: list[tuple[int, int]] = []

    def __call__(self, task) -> None:
        self.seen.append((task.id, task.attempt))
        if task.id in self.failing:
            raise RuntimeError(f"task {task.id} fails on purpose")


@pytest.fixture
def holder(db_url):
    connections = ConnectionHolder(db_url)
    yield connections
    connections.discard()


def make_worker(holder, db_url, processor, **env) -> Worker:
    return Worker(holder, db.settings(db_url, **env), processor)


def retry_time_comes(conn, task_id: int) -> None:
    """Bring the task's retry time to now, as if its backoff had passed."""
    conn.execute(
        'UPDATE "Tasks" SET "NotBefore" = statement_timestamp() WHERE "Id" = %s',
        (task_id,),
    )


def backoff_seconds(conn, task_id: int) -> float:
    return conn.execute(
        'SELECT extract(epoch FROM "NotBefore" - "LastFailedAt") FROM "Tasks"'
        ' WHERE "Id" = %s',
        (task_id,),
    ).fetchone()[0]


def dead_letter(conn, task_id: int) -> dict | None:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            'SELECT * FROM "DeadLetters" WHERE "Id" = %s', (task_id,)
        ).fetchone()


def test_failing_head_is_retried_with_backoff_then_dead_lettered_and_its_batch_goes_on(
    conn, db_url, holder
):
    # GIVEN batch A whose head always fails, then two good tasks; and batch B
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])
    b_ids = enqueue_many(conn, [("B", {"n": n}) for n in range(2)])
    enqueued_at = db.task(conn, a_ids[0])["EnqueuedAt"]
    processor = Scripted(a_ids[0])
    worker = make_worker(
        holder, db_url, processor, MAX_ATTEMPTS=3, RETRY_BASE_SECONDS=60
    )

    # WHEN A's head fails for the first time
    first = worker.run("worker-1", preferred_batch_id="A")

    # THEN it stays at the head with its error, and a retry time 30-60 s away
    assert (first.outcome, first.failed_task_id) == (Outcome.TASK_FAILED, a_ids[0])
    head = db.task(conn, a_ids[0])
    assert head["Attempts"] == 1
    assert head["LastError"] == f"RuntimeError: task {a_ids[0]} fails on purpose"
    assert head["FirstFailedAt"] == head["LastFailedAt"]
    assert 30 <= backoff_seconds(conn, a_ids[0]) <= 60
    assert db.lease(conn, "A")["LockedBy"] is None

    # WHEN workers come while it waits
    waiting = [worker.run(f"worker-{n}", preferred_batch_id="A") for n in (2, 3)]

    # THEN A is left alone, no later task of A starts, and B is worked meanwhile
    assert [report.batch_id for report in waiting] == ["B", None]
    assert waiting[0].outcome == Outcome.DRAINED
    assert [t.task_id for t in waiting[0].completed] == b_ids
    assert [db.task(conn, i)["Attempts"] for i in a_ids] == [1, 0, 0]

    # WHEN its retry time comes and it fails again
    retry_time_comes(conn, a_ids[0])
    second = worker.run("worker-4", preferred_batch_id="A")

    # THEN the backoff has doubled (60-120 s), and the first failure time is kept
    assert second.outcome == Outcome.TASK_FAILED
    assert 60 <= backoff_seconds(conn, a_ids[0]) <= 120
    again = db.task(conn, a_ids[0])
    assert again["Attempts"] == 2
    assert again["FirstFailedAt"] == head["FirstFailedAt"] < again["LastFailedAt"]

    # WHEN it fails its third and last allowed attempt
    retry_time_comes(conn, a_ids[0])
    third = worker.run("worker-5", preferred_batch_id="A")

    # THEN it moves to the dead letters with everything known of it
    assert third.outcome == Outcome.DEAD_LETTERED
    assert third.dead_lettered == [a_ids[0]]
    letter = dead_letter(conn, a_ids[0])
    assert letter["BatchId"] == "A"
    assert letter["Payload"] == {"n": 0}
    assert letter["EnqueuedAt"] == enqueued_at
    assert letter["Attempts"] == 3
    assert letter["LastError"] == head["LastError"]
    assert letter["FirstFailedAt"] == head["FirstFailedAt"] < letter["LastFailedAt"]
    assert letter["DeadLetteredAt"] == letter["LastFailedAt"]
    assert letter["Reason"] == "failed"
    assert db.pending_ids(conn, "A") == a_ids[1:]

    # AND the batch goes on with its next tasks, in order
    fourth = worker.run("worker-6", preferred_batch_id="A")
    assert [t.task_id for t in fourth.completed] == a_ids[1:]
    assert [seen for seen in processor.seen if seen[0] in a_ids] == [
        (a_ids[0], 1),
        (a_ids[0], 2),
        (a_ids[0], 3),
        (a_ids[1], 1),
        (a_ids[2], 1),
    ]


def test_halt_policy_stops_the_batch_until_an_operator_resumes_it(
    conn, db_url, holder, caplog
):
    # GIVEN batch A, whose own policy is two attempts then halt (the deployment's is
    # five attempts then dead-letter), with a failing head and a good task
    a_ids = enqueue_many(conn, [("A", {"n": 0}), ("A", {"n": 1})])
    (b_id,) = enqueue_many(conn, [("B", {"n": 0})])
    assert operations.set_batch_policy(
        conn, "A", max_attempts=2, on_exhausted="halt"
    ) == (2, "halt")
    processor = Scripted(a_ids[0])
    worker = make_worker(holder, db_url, processor, RETRY_BASE_SECONDS=60)

    # WHEN the head fails twice
    caplog.set_level(logging.INFO, logger="queue_core")
    first = worker.run("worker-1", preferred_batch_id="A")
    retry_time_comes(conn, a_ids[0])
    second = worker.run("worker-2", preferred_batch_id="A")

    # THEN the batch is halted: reported, logged at ERROR, shown to operators
    assert (first.outcome, second.outcome) == (
        Outcome.TASK_FAILED,
        Outcome.BATCH_HALTED,
    )
    assert second.halted_batch_ids == ["A"]
    halted = [r for r in caplog.records if getattr(r, "action", "") == "batch_halted"]
    assert [(r.levelno, r.batch_id, r.task_id) for r in halted] == [
        (logging.ERROR, "A", a_ids[0])
    ]
    (view,) = operations.list_batches(conn, 300, "A")
    assert view.halted_at is not None
    assert f"task {a_ids[0]}" in view.halt_reason
    assert "fails on purpose" in view.halt_reason
    assert (view.pending, view.head_id, view.head_attempts) == (2, a_ids[0], 2)

    # AND it keeps its task, and is never claimed, not even when asked for by name
    later = [worker.run(f"worker-{n}", preferred_batch_id="A") for n in (3, 4)]
    assert [report.batch_id for report in later] == ["B", None]
    assert db.pending_ids(conn, "A") == a_ids
    assert db.task(conn, a_ids[1])["Attempts"] == 0

    # WHEN the cause is fixed and an operator resumes the batch
    processor.failing.clear()
    resumed = operations.resume_batch(conn, "A")

    # THEN its head starts again with a fresh set of attempts, then the rest, in order
    assert (resumed.was_halted, resumed.head_id, resumed.head_held) == (
        True,
        a_ids[0],
        False,
    )
    report = worker.run("worker-5", preferred_batch_id="A")
    assert report.outcome == Outcome.DRAINED
    assert [(t.task_id, t.attempt) for t in report.completed] == [
        (a_ids[0], 1),
        (a_ids[1], 1),
    ]
    assert b_id not in db.pending_ids(conn)

    # AND resuming a batch that is not halted does nothing
    assert operations.resume_batch(conn, "A").was_halted is False


def test_dead_letters_are_redriven_into_their_original_places(conn, db_url, holder):
    # GIVEN batch A whose first two tasks failed their only attempt, the third done
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])
    processor = Scripted(a_ids[0], a_ids[1])
    worker = make_worker(holder, db_url, processor, MAX_ATTEMPTS=1)
    reports = [worker.run("worker-1", preferred_batch_id="A") for _ in range(3)]
    assert [r.outcome for r in reports] == [
        Outcome.DEAD_LETTERED,
        Outcome.DEAD_LETTERED,
        Outcome.DRAINED,
    ]
    assert [d.id for d in operations.list_dead_letters(conn, "A")] == a_ids[:2]

    # AND a task enqueued after them
    (later_id,) = enqueue_many(conn, [("A", {"n": 3})])

    # WHEN the cause is fixed and the dead letters are redriven
    processor.failing.clear()
    redriven = operations.redrive_dead_letters(conn, batch_id="A")

    # THEN they are back at the head, in their original order, before the later task
    assert redriven == {"A": a_ids[:2]}
    assert db.pending_ids(conn, "A") == [a_ids[0], a_ids[1], later_id]
    assert operations.list_dead_letters(conn) == []
    assert [db.task(conn, i)["Attempts"] for i in a_ids[:2]] == [0, 0]

    # AND they are worked in that order, each with a fresh set of attempts
    report = worker.run("worker-2", preferred_batch_id="A")
    assert [(t.task_id, t.attempt) for t in report.completed] == [
        (a_ids[0], 1),
        (a_ids[1], 1),
        (later_id, 1),
    ]

    # AND a second redrive finds nothing to do
    assert operations.redrive_dead_letters(conn) == {}


def test_redrive_while_an_owner_works_the_batch_puts_the_task_next(
    conn, db_url, holder, second_holder
):
    # GIVEN batch A: a dead letter, then two pending tasks
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])
    make_worker(holder, db_url, Scripted(a_ids[0]), MAX_ATTEMPTS=1).run("worker-0")
    assert db.pending_ids(conn, "A") == a_ids[1:]

    # AND an owner in the middle of A's second task
    seen: list[int] = []

    def processor(task):
        seen.append(task.id)
        # WHEN an operator redrives the dead letter meanwhile
        if task.id == a_ids[1]:
            assert operations.redrive_dead_letters(second_holder.get()) == {
                "A": [a_ids[0]]
            }

    report = make_worker(holder, db_url, processor).run("worker-1")

    # THEN the owner takes the redriven task next, before the later one
    assert seen == [a_ids[1], a_ids[0], a_ids[2]]
    assert report.outcome == Outcome.DRAINED


def test_head_put_back_between_claim_and_lock_is_handed_back_not_run_uncounted(
    conn, db_url, holder, second_holder
):
    # GIVEN batch A: a dead letter, then a pending task
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(2)])
    make_worker(holder, db_url, Scripted(a_ids[0]), MAX_ATTEMPTS=1).run("worker-0")

    # AND a worker that, right after its claim counted a start of the pending task,
    # sees the dead letter put back ahead of it
    def redrive_on_lock(name: str):
        if name == "lock_head":
            operations.redrive_dead_letters(second_holder.get())
        return contextlib.nullcontext()

    worker = Worker(holder, db.settings(db_url), Scripted(), step_span=redrive_on_lock)

    # WHEN it runs
    report = worker.run("worker-1")

    # THEN it runs nothing: the new head's start was not counted under its lease
    assert (report.outcome, report.completed) == (Outcome.HEAD_WAITING, [])
    assert db.lease(conn, "A")["LockedBy"] is None

    # AND the next run counts and works the new head first
    processor = Scripted()
    again = make_worker(holder, db_url, processor).run("worker-2")
    assert [task_id for task_id, _ in processor.seen] == a_ids
    assert again.outcome == Outcome.DRAINED


def test_next_task_waiting_for_its_retry_time_is_not_started_early(
    conn, db_url, holder
):
    # GIVEN batch A: a dead letter, then a task that failed and waits a minute to retry
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(2)])
    make_worker(holder, db_url, Scripted(a_ids[0], a_ids[1]), MAX_ATTEMPTS=1).run(
        "worker-0"
    )
    make_worker(
        holder, db_url, Scripted(a_ids[1]), MAX_ATTEMPTS=5, RETRY_BASE_SECONDS=60
    ).run("worker-0")
    assert db.task(conn, a_ids[1])["Attempts"] == 1

    # AND the dead letter redriven ahead of it
    operations.redrive_dead_letters(conn, "A")

    # WHEN a worker works A
    processor = Scripted()
    report = make_worker(holder, db_url, processor).run("worker-1")

    # THEN it does the redriven task, then hands the batch back: the next one waits
    assert [t.task_id for t in report.completed] == [a_ids[0]]
    assert report.outcome == Outcome.HEAD_WAITING
    assert db.task(conn, a_ids[1])["Attempts"] == 1
    assert db.lease(conn, "A")["LockedBy"] is None


def test_cancelled_batch_goes_to_the_dead_letters_and_can_come_back(
    conn, db_url, holder
):
    # GIVEN batch A with three tasks, and a worker in the middle of the first
    a_ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])
    in_task, let_go = threading.Event(), threading.Event()

    def blocking(task):
        in_task.set()
        assert let_go.wait(timeout=30)

    worker = make_worker(holder, db_url, blocking)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run("worker-1")))
    thread.start()
    try:
        assert in_task.wait(timeout=30)

        # WHEN an operator cancels the batch
        cancelled = operations.cancel_batch(conn, "A")
    finally:
        let_go.set()
        thread.join(timeout=30)

    # THEN its pending tasks are dead letters, the one in flight was left to finish
    assert (cancelled.cancelled, cancelled.in_flight) == (a_ids[1:], a_ids[:1])
    assert [(d.id, d.reason) for d in operations.list_dead_letters(conn)] == [
        (a_ids[1], "cancelled"),
        (a_ids[2], "cancelled"),
    ]
    (report,) = outcome
    assert [t.task_id for t in report.completed] == a_ids[:1]
    assert report.outcome == Outcome.DRAINED
    assert db.pending_ids(conn) == []

    # WHEN they are redriven, THEN they are worked in order
    operations.redrive_dead_letters(conn, "A")
    seen = Scripted()
    make_worker(holder, db_url, seen).run("worker-2")
    assert [task_id for task_id, _ in seen.seen] == a_ids[1:]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no text for this error")


@pytest.mark.parametrize(
    ("error", "expected_start"),
    [
        (RuntimeError("nul\x00inside"), "RuntimeError: nulinside"),
        (RuntimeError("lone \ud800 surrogate"), "RuntimeError: lone ? surrogate"),
        (RuntimeError("x" * 100_000), "RuntimeError: xxx"),
        (Unprintable(), "Unprintable: <error text unavailable>"),
    ],
    ids=["NUL", "surrogate", "huge", "unprintable"],
)
def test_any_error_text_is_recorded_cleaned(
    conn, db_url, holder, error, expected_start
):
    # GIVEN a task whose processor raises an error with awkward text
    (task_id,) = enqueue_many(conn, [("A", {})])

    def processor(task):
        raise error

    # WHEN it fails
    report = make_worker(holder, db_url, processor).run("worker-1")

    # THEN the failure is recorded, its text cleaned and bounded
    assert report.outcome == Outcome.TASK_FAILED
    stored = db.task(conn, task_id)["LastError"]
    assert stored.startswith(expected_start)
    assert "\x00" not in stored and len(stored) <= 2000
    assert db.task(conn, task_id)["NotBefore"] is not None


@pytest.fixture
def second_holder(db_url):
    connections = ConnectionHolder(db_url)
    yield connections
    connections.discard()
