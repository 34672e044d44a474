"""The metrics an operator watches, as the handler writes them: CloudWatch EMF documents
on standard output (Powertools Metrics), read back here from the captured output."""

import json
from collections import defaultdict

import pytest

from queue_core import enqueue_many, operations
from queue_core.lease import claim_batch
from queue_core.models import Outcome, WorkReport
from tests.support import db
from tests.support.events import REPO_EVENTS, load_event, with_unique_ids
from tests.support.lambda_context import LambdaContext

NAMESPACE = "TaskQueue"
QUEUE_GAUGES = {"QueueDepth", "OldestPendingAge"}


class Emitted:
    """The EMF documents printed during one invocation."""

    def __init__(self, output: str) -> None:
        self.documents = [
            document
            for document in (
                json.loads(line) for line in output.splitlines() if line.startswith("{")
            )
            if "_aws" in document
        ]
        assert self.documents, f"no EMF document in the output:\n{output}"
        self.values: dict[str, list[float]] = defaultdict(list)
        self.units: dict[str, str] = {}
        self.dimension_sets: list[list[str]] = []
        for document in self.documents:
            for directive in document["_aws"]["CloudWatchMetrics"]:
                assert directive["Namespace"] == NAMESPACE
                self.dimension_sets += directive["Dimensions"]
                for metric in directive["Metrics"]:
                    name = metric["Name"]
                    self.units[name] = metric["Unit"]
                    value = document[name]
                    self.values[name] += value if isinstance(value, list) else [value]

    def total(self, name: str) -> float:
        assert name in self.values, f"{name} not emitted: {sorted(self.values)}"
        return sum(self.values[name])


@pytest.fixture
def invoke(handler_app, capsys):
    """Invoke the handler with a named event; the metrics it emitted."""

    def run(event) -> tuple[dict, Emitted]:
        if isinstance(event, str):
            event = load_event(event)
        capsys.readouterr()
        response = handler_app.lambda_handler(with_unique_ids(event), LambdaContext(30))
        return response, Emitted(capsys.readouterr().out)

    return run


def test_scheduled_tick_reports_queue_depth_and_oldest_age(invoke, conn):
    # GIVEN three pending tasks over two batches, the first enqueued a while ago
    enqueue_many(conn, [("A", {}), ("A", {}), ("B", {})])
    conn.execute(
        """UPDATE "Tasks" SET "EnqueuedAt" = now() - interval '90 seconds'"""
        """ WHERE "Id" = (SELECT min("Id") FROM "Tasks")"""
    )

    # WHEN the schedule ticks
    report, emitted = invoke("schedule-default")

    # THEN the gauges describe the queue as the tick found it
    assert emitted.values["QueueDepth"] == [3]
    (oldest,) = emitted.values["OldestPendingAge"]
    assert oldest >= 90
    assert emitted.units["OldestPendingAge"] == "Seconds"

    # AND the worker's own figures follow
    completed = len(report["completed"])
    assert completed >= 1
    assert emitted.total("TasksCompleted") == completed
    assert len(emitted.values["TaskDuration"]) == completed
    assert emitted.units["TaskDuration"] == "Milliseconds"
    assert emitted.total("TasksFailed") == 0
    assert emitted.total("TasksDeadLettered") == 0

    # AND no metric carries a dimension that grows with the batches or the workers
    assert {name for dims in emitted.dimension_sets for name in dims} <= {
        "service",
        "function_name",
    }


def test_scheduler_default_event_counts_as_a_tick(invoke, conn):
    # GIVEN the default event of EventBridge Scheduler (its "detail" is the text "{}")
    event = json.loads((REPO_EVENTS / "schedule-scheduler-default.json").read_text())
    enqueue_many(conn, [("A", {})])

    # WHEN it arrives
    report, emitted = invoke(event)

    # THEN it is handled as a scheduled tick: gauges, then work
    assert emitted.values["QueueDepth"] == [1]
    assert report["outcome"] == "drained"


def test_idle_tick_reports_an_empty_queue_and_no_work(invoke):
    _report, emitted = invoke("schedule-default")

    assert emitted.values["QueueDepth"] == [0]
    assert emitted.values["OldestPendingAge"] == [0]
    assert emitted.total("NoWorkInvocations") == 1
    assert emitted.total("TasksCompleted") == 0


def test_function_url_invocation_measures_no_queue_gauges(invoke, conn):
    enqueue_many(conn, [("B", {})])

    _response, emitted = invoke("function-url-process-task")

    assert not QUEUE_GAUGES & set(emitted.values)
    assert emitted.total("TasksCompleted") == 1


def test_failure_then_retry_are_counted(invoke, conn, monkeypatch):
    # GIVEN a task that fails on its first attempt, retried almost at once
    monkeypatch.setenv("RETRY_BASE_SECONDS", "0.001")
    monkeypatch.setenv("RETRY_MAX_SECONDS", "0.001")
    monkeypatch.setenv("TASK_PROCESSOR", "tests.support.processors:record_or_fail")
    (task_id,) = enqueue_many(conn, [("A", {"fail_attempts": 1})])

    # WHEN a first tick fails it
    report, emitted = invoke("schedule-default")

    # THEN a failure is counted, and nothing completed
    assert report["outcome"] == Outcome.TASK_FAILED
    assert emitted.total("TasksFailed") == 1
    assert emitted.total("TaskRetries") == 0

    # AND when a later tick completes it on its second attempt, a retry is counted
    def retried():
        report, emitted = invoke("schedule-default")
        return emitted if report["completed"] == [task_id] else None

    emitted = db.wait_until(retried, timeout=20, what="the retry", interval=0.01)
    assert emitted.total("TaskRetries") == 1
    assert emitted.total("TasksFailed") == 0


def test_lease_takeover_is_counted(invoke, conn):
    # GIVEN batch A claimed by a worker that then vanished, its lease long expired
    enqueue_many(conn, [("A", {})])
    claim_batch(conn, "vanished-worker", 30, preferred_batch_id="A")
    conn.execute(
        """UPDATE "BatchLocks" SET "LockedAt" = now() - interval '1 hour'"""
        """ WHERE "BatchId" = 'A'"""
    )

    # WHEN the next tick comes
    report, emitted = invoke("schedule-default")

    # THEN it took the batch over, and said so
    assert report["takenOverFrom"] == "vanished-worker"
    assert emitted.total("LeaseTakeovers") == 1


def test_dead_lettered_tasks_of_a_report_are_counted(handler_app, capsys):
    # GIVEN a worker's report naming two tasks it moved to the dead letters
    report = WorkReport("w-1", outcome=Outcome.DRAINED, batch_id="A")
    report.dead_lettered.extend([7, 8])

    # WHEN the handler records its metrics
    capsys.readouterr()
    handler_app._record_metrics(report)
    handler_app.metrics.flush_metrics()

    # THEN both are counted, for the dead-letter alarm
    assert Emitted(capsys.readouterr().out).total("TasksDeadLettered") == 2


def test_queue_gauges_stay_cheap_and_true_beyond_ten_thousand_pending(conn):
    # GIVEN more pending tasks than the gauges count one by one, the first an hour old
    enqueue_many(conn, [(f"b{n}", {}) for n in range(100)])
    conn.execute('DELETE FROM "Tasks"')
    conn.execute(
        """INSERT INTO "Tasks" ("BatchId", "EnqueuedAt")
           SELECT 'b' || (n % 100), now() - (n = 0)::int * interval '1 hour'
           FROM generate_series(0, 29999) AS n ORDER BY n"""
    )

    def gauges_once_counted(expected: int):
        # Each session reports its inserts and deletes to the statistics at its
        # next idle moment, at most once a second: ask for it now.
        conn.execute("SELECT pg_stat_force_next_flush()")
        return db.wait_until(
            lambda: (
                (gauges := operations.queue_gauges(conn)).pending == expected and gauges
            ),
            timeout=10,
            what=f"the depth gauge to read {expected}",
        )

    # THEN the depth follows inserts and deletes, without an ANALYZE
    gauges = gauges_once_counted(30_000)
    assert 3600 <= gauges.oldest_pending_seconds < 3660
    conn.execute(
        'DELETE FROM "Tasks" WHERE "Id" IN (SELECT "Id" FROM "Tasks" LIMIT 18000)'
    )
    gauges_once_counted(12_000)

    # AND when the statistics are lost (a crash, a reset), the last ANALYZE stands in
    conn.execute('ANALYZE "Tasks"')
    conn.execute("""SELECT pg_stat_reset_single_table_counters('"Tasks"'::regclass)""")
    assert abs(operations.queue_gauges(conn).pending - 12_000) <= 200

    conn.execute(
        'DELETE FROM "Tasks" WHERE "Id" IN (SELECT "Id" FROM "Tasks" LIMIT 2000)'
    )
    assert operations.queue_gauges(conn).pending == 10_000  # counted, exactly
    conn.execute('DELETE FROM "Tasks"')
    assert operations.queue_gauges(conn) == operations.QueueGauges(0, 0.0)

    # AND the oldest task is found through the primary key
    plan = "\n".join(
        row[0]
        for row in conn.execute(
            'EXPLAIN (COSTS OFF) SELECT * FROM "QueueGauges"'
        ).fetchall()
    )
    assert '"Tasks_pkey"' in plan
