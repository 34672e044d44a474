"""The scheduled tick as dispatcher: its decision on a real PostgreSQL, its fan-out
through boto3 against moto, its idle cost, and the fairness of the claim order."""

import io
import json
import math
import os
import subprocess
import sys
import zipfile

import boto3
import psycopg
import pytest
from moto import mock_aws

from handler import kick
from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many
from queue_core.dispatch import plan_dispatch
from queue_core.lease import claim_batch
from tests.conftest import REPO_ROOT
from tests.support import db
from tests.support.events import load_event, with_unique_ids
from tests.support.lambda_context import LambdaContext

FUNCTION = LambdaContext.function_name
NO_WORK = "queue_core.processor:no_work"


@pytest.fixture
def lambda_calls(monkeypatch):
    """A moto Lambda with this function deployed; the Invoke calls boto3 made."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws(config={"lambda": {"use_docker": False}}):
        role = boto3.client("iam").create_role(
            RoleName="queue-worker",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )["Role"]["Arn"]
        client = boto3.client("lambda")
        client.create_function(
            FunctionName=FUNCTION,
            Runtime="python3.12",
            Role=role,
            Handler="handler.app.lambda_handler",
            Code={"ZipFile": _zip_of("handler/app.py", "")},
        )
        calls: list[dict] = []
        client.meta.events.register(
            "provide-client-params.lambda.Invoke",
            lambda params, **_: calls.append(dict(params)),
        )
        monkeypatch.setattr(kick, "_client", client)
        yield calls


def _zip_of(name: str, text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, text)
    return buffer.getvalue()


def tick(app, remaining_seconds: float = 60):
    context = LambdaContext(remaining_seconds)
    return app.lambda_handler(with_unique_ids(load_event("schedule-default")), context)


# ------------------------------------------------------------------ the decision


def test_plan_counts_only_batches_a_worker_could_claim_now(conn):
    # GIVEN a free batch, a batch whose head waits for its retry, a held batch, a
    # batch whose lease expired, and a batch marked but empty
    enqueue_many(conn, [(b, {}) for b in ["free", "waiting", "held", "expired"]])
    conn.execute(
        """UPDATE "Tasks" SET "NotBefore" = now() + interval '1 hour'
           WHERE "BatchId" = 'waiting'"""
    )
    claim_batch(conn, "other", 300, preferred_batch_id="held")
    claim_batch(conn, "gone", 300, preferred_batch_id="expired")
    conn.execute(
        """UPDATE "BatchLocks" SET "LockedAt" = now() - interval '1 hour'
           WHERE "BatchId" = 'expired'"""
    )
    conn.execute(
        """INSERT INTO "BatchLocks" ("BatchId", "MaybePending")
           VALUES ('ghost', true)"""
    )

    # WHEN the tick plans with room for ten workers
    plan = plan_dispatch(conn, lease_seconds=300, max_concurrency=10)

    # THEN "free" and "expired" are claimable and one lease is held
    assert (plan.claimable, plan.held) == (2, 1)
    assert (plan.work_here, plan.start_others) == (True, 1)


@pytest.mark.parametrize(
    ("claimable", "held", "cap", "work_here", "others"),
    [
        (0, 0, 10, False, 0),  # idle: nothing at all
        (1, 0, 10, True, 0),  # one batch: the tick works it, no invoke
        (5, 0, 3, True, 2),  # more than the cap: the tick and two more
        (5, 2, 3, True, 0),  # two held: one slot left, the tick's own
        (5, 3, 3, False, 0),  # at the cap: nothing
    ],
)
def test_plan_never_exceeds_the_cap(claimable, held, cap, work_here, others):
    from queue_core.dispatch import DispatchPlan

    plan = DispatchPlan(claimable, held, cap)
    assert (plan.work_here, plan.start_others) == (work_here, others)


# ------------------------------------------------------------------ the tick


def test_idle_tick_issues_one_query_and_invokes_nothing(
    handler_app, monkeypatch, lambda_calls
):
    # GIVEN an empty queue and room for ten workers
    monkeypatch.setenv("MAX_CONCURRENCY", "10")
    statements = _count_statements(monkeypatch)

    # WHEN the schedule ticks
    response = tick(handler_app)

    # THEN it opened one connection, sent one statement and invoked nothing
    assert statements == [1]
    assert lambda_calls == []
    assert response["outcome"] == "no_work"
    assert response["dispatch"]["claimable"] == 0


def test_busy_tick_starts_workers_up_to_the_cap_and_works_one_itself(
    handler_app, conn, monkeypatch, lambda_calls
):
    # GIVEN five batches with work, a cap of three workers, two batches per worker
    enqueue_many(conn, [(b, {"n": n}) for b in "ABCDE" for n in range(2)])
    monkeypatch.setenv("MAX_CONCURRENCY", "3")
    monkeypatch.setenv("WORKER_MAX_BATCHES", "2")

    # WHEN the schedule ticks
    response = tick(handler_app)

    # THEN it asked Lambda for two asynchronous invocations of itself...
    assert [call["InvocationType"] for call in lambda_calls] == ["Event", "Event"]
    assert {call["FunctionName"] for call in lambda_calls} == {FUNCTION}
    assert [json.loads(call["Payload"]) for call in lambda_calls] == [
        {"maxBatches": 2},
        {"maxBatches": 2},
    ]
    assert response["dispatch"]["started"] == 2
    # AND worked two batches itself, in order, least recently worked first
    assert (response["batchId"], response["outcome"]) == ("A", "drained")
    assert response["more"][0]["batchId"] == "B"


def test_tick_at_the_cap_starts_nothing(handler_app, conn, monkeypatch, lambda_calls):
    # GIVEN three batches with work, two of them held by running workers, cap two
    enqueue_many(conn, [(b, {}) for b in "ABC"])
    claim_batch(conn, "running-1", 300)
    claim_batch(conn, "running-2", 300)
    monkeypatch.setenv("MAX_CONCURRENCY", "2")

    # WHEN the schedule ticks
    response = tick(handler_app)

    # THEN it neither invokes nor works
    assert lambda_calls == []
    assert response["outcome"] == "no_work"
    assert db.pending_ids(conn, "C") != []


def test_kick_invokes_the_worker_for_the_batch(lambda_calls):
    # WHEN a producer kicks after committing a task of batch B
    accepted = kick.kick(FUNCTION, "B")

    # THEN Lambda accepted one asynchronous invocation naming B
    assert accepted is True
    assert [(c["InvocationType"], json.loads(c["Payload"])) for c in lambda_calls] == [
        ("Event", {"batchId": "B"})
    ]


def test_idle_tick_does_not_import_boto3(db_url):
    # GIVEN a fresh interpreter, as in a cold Lambda environment
    script = (
        "import sys\n"
        "from tests.support.lambda_context import LambdaContext\n"
        "from tests.support.events import load_event\n"
        "import handler.app as app\n"
        "event = load_event('schedule-default')\n"
        "response = app.lambda_handler(event, LambdaContext())\n"
        "assert response['outcome'] == 'no_work', response\n"
        "print('boto3 imported:', 'boto3' in sys.modules)\n"
    )
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
        "DATABASE_URL": db_url,
        "MAX_CONCURRENCY": "10",
        "POWERTOOLS_TRACE_DISABLED": "1",
    }

    # WHEN it imports the handler and runs an idle tick
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        timeout=60,
    )

    # THEN boto3 was never imported
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "boto3 imported: False" in done.stdout.decode()


# ------------------------------------------------------------------ fairness


def test_every_batch_is_worked_within_a_bounded_number_of_ticks(conn, db_url):
    # GIVEN twelve batches, one of them huge, and ticks that start four workers each
    # with time for one task
    batches = [f"b{n:02}" for n in range(12)]
    enqueue_many(conn, [("b00", {})] * 200 + [(b, {}) for b in batches[1:]] * 5)
    holder = ConnectionHolder(db_url)
    worker = Worker(holder, db.settings(db_url, TASK_PROCESSOR=NO_WORK))
    workers_per_tick = 4
    bound = math.ceil(len(batches) / workers_per_tick)

    # WHEN twelve ticks run
    worked: list[set[str]] = []
    for _ in range(12):
        plan = plan_dispatch(holder.get(), 300, workers_per_tick)
        this_tick = set()
        for number in range(plan.claimable):
            report = worker.run(f"w{number}", time_left=_time_for_one_task())
            assert report.outcome == Outcome.TIME_UP
            this_tick.add(report.batch_id)
        worked.append(this_tick)
    holder.discard()

    # THEN every batch was worked in every window of `bound` consecutive ticks
    for start in range(len(worked) - bound + 1):
        window = set().union(*worked[start : start + bound])
        assert window == set(batches), (start, worked)


def _time_for_one_task():
    """Plenty of time for the claim and the first task, none after it."""
    answers = iter([math.inf])
    return lambda: next(answers, 0.0)


def _count_statements(monkeypatch) -> list[int]:
    """Count the statements the handler's connections send; [n] once connected."""
    counts: list[int] = []

    class CountingConnection(psycopg.Connection):
        def execute(self, *args, **kwargs):
            counts[0] += 1
            return super().execute(*args, **kwargs)

    def connect(conninfo, **kwargs):
        counts.append(0)
        return CountingConnection.connect(conninfo, **kwargs)

    monkeypatch.setattr("queue_core.db.psycopg.connect", connect)
    return counts


def test_a_halted_batch_is_not_counted_as_claimable(conn):
    # GIVEN a batch with pending work whose operator policy halted it, and one healthy
    enqueue_many(conn, [("halted", {"n": 1}), ("healthy", {"n": 1})])
    conn.execute(
        """UPDATE "BatchLocks" SET "HaltedAt" = now(), "HaltReason" = 'test'
           WHERE "BatchId" = 'halted'"""
    )

    # WHEN the tick plans
    plan = plan_dispatch(conn, lease_seconds=300, max_concurrency=10)

    # THEN only the healthy batch counts: no worker is started for the halted one
    assert plan.claimable == 1
