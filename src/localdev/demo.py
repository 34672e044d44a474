"""`make run`: a real queue on a real PostgreSQL, worked by Lambda handlers at once.

Migrates a fresh demo database, enqueues tasks over batches A, B and C, then starts
workers that call handler.app.lambda_handler with real-format events (the every-minute
schedule, a schedule with Input, the Function URL POST, a direct invoke) until the queue
is empty. It prints each completion as it happens and, at the end, per batch, the order
in which tasks completed and by which worker, with a verdict on order and ownership.
"""

import argparse
import base64
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import conninfo, sql

from localdev import audit
from localdev.embedded_pg import DEMO_DATABASE

REPO_ROOT = Path(__file__).resolve().parents[2]
EVENTS = REPO_ROOT / "events"
# The events each worker cycles through, as EventBridge, the Function URL and `aws
# lambda invoke` would send them.
EVENT_FILES = (
    "schedule-default.json",
    "function-url-process-task.json",
    "schedule-input-batch-b.json",
    "direct-invoke.json",
    "function-url-base64-body.json",
)
# Short, so that invocations run out of time mid-batch and hand their batch over.
LAMBDA_TIMEOUT_SECONDS = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tasks-per-batch", type=int, default=12)
    parser.add_argument("--batches", default="A,B,C")
    parser.add_argument("--worker-process", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_process is not None:
        return _worker_process(args.worker_process)
    return _demo(args)


def _demo(args) -> int:
    base_url = os.environ["DATABASE_URL"]
    url = _fresh_database(base_url)
    env = {**os.environ, "DATABASE_URL": url}
    env.setdefault("POWERTOOLS_TRACE_DISABLED", "1")
    env.setdefault("POWERTOOLS_SERVICE_NAME", "task-queue-demo")
    env.setdefault("TASK_BUDGET_SECONDS", "3")
    env.setdefault("SAFETY_MARGIN_SECONDS", "2")

    batches = args.batches.split(",")
    total = _migrate_and_enqueue(url, batches, args.tasks_per_batch)
    seconds = os.environ.get("SIMULATED_TASK_SECONDS", "1-2")
    print(
        f"Enqueued {total} tasks over batches {', '.join(batches)} "
        f"(each a simulated {seconds} s job).\n"
        f"Starting {args.workers} worker processes, each invoking lambda_handler "
        "with real-format events...\n"
    )

    completions: list[audit.Completion] = []
    lock = threading.Lock()
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "localdev.demo", "--worker-process", str(number)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for number in range(1, args.workers + 1)
    ]
    readers = [
        threading.Thread(target=_read_logs, args=(p, completions, lock, total, started))
        for p in processes
    ]
    for reader in readers:
        reader.start()
    for process in processes:
        process.wait()
    for reader in readers:
        reader.join()

    return _report(url, completions, total, time.monotonic() - started)


def _fresh_database(base_url: str) -> str:
    """A new, empty demo database on the same server; else the given one."""
    try:
        with psycopg.connect(base_url, autocommit=True) as conn:
            name = sql.Identifier(DEMO_DATABASE)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name)
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    except psycopg.errors.InsufficientPrivilege:
        print("(no right to create a database: using DATABASE_URL's own database)")
        return base_url
    return conninfo.make_conninfo(base_url, dbname=DEMO_DATABASE)


def _migrate_and_enqueue(url: str, batches: list[str], per_batch: int) -> int:
    from queue_core import enqueue_many, migrate

    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        tasks = [
            (batch, {"batch": batch, "step": step})
            for step in range(1, per_batch + 1)
            for batch in batches
        ]
        with conn.transaction():
            enqueue_many(conn, tasks)
    return len(tasks)


def _read_logs(process, completions, lock, total, started) -> None:
    for line in process.stdout:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("action") != "task_completed":
            continue
        completion = audit.Completion.from_log(record)
        with lock:
            completions.append(completion)
            done = len(completions)
        print(
            f"  [{done:>3}/{total}] {time.monotonic() - started:6.1f}s"
            f"  batch {completion.batch_id:<4}"
            f" task {completion.task_id:>3}  by {completion.worker_id:<18}"
            f" attempt {completion.attempt}",
            flush=True,
        )


def _report(
    url: str, completions: list[audit.Completion], total: int, elapsed: float
) -> int:
    print(f"\nCompletion order per batch ({elapsed:.1f} s):")
    for batch_id, done in audit.by_batch(completions).items():
        print(f"  {batch_id}:")
        for completion in done:
            print(f"    task {completion.task_id:>3}  by {completion.worker_id}")

    with psycopg.connect(url) as conn:
        left = conn.execute('SELECT count(*) FROM "Tasks"').fetchone()[0]
    verdict = audit.check(completions)
    owners = len({c.worker_id.split("#")[0] for c in completions})
    if verdict.held and left == 0 and verdict.completions == total:
        print(
            f"\nVERDICT: OK - {total} tasks completed once each, in Id order "
            "within every "
            f"batch, never two workers on a batch at once ({owners} worker processes "
            "took part); the tasks table is empty."
        )
        return 0
    print("\nVERDICT: FAILED")
    for problem in verdict.order_violations + verdict.overlaps:
        print(f"  {problem}")
    if verdict.duplicates:
        print(f"  completed more than once: {verdict.duplicates}")
    print(
        f"  completed {verdict.completions} of {total}; {left} left in the tasks table"
    )
    return 1


class _Context:
    """The parts of the Lambda context object the handler uses."""

    function_name = "task-queue-worker"
    function_version = "$LATEST"
    memory_limit_in_mb = 256
    invoked_function_arn = (
        "arn:aws:lambda:eu-west-1:123456789012:function:task-queue-worker"
    )

    def __init__(self, request_id: str, timeout: float) -> None:
        self.aws_request_id = request_id
        self._deadline = time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return int(max(self._deadline - time.monotonic(), 0) * 1000)


def _worker_process(number: int) -> int:
    """Invoke the handler again and again, as Lambda would, until the queue is empty."""
    from handler.app import lambda_handler

    events = [json.loads((EVENTS / name).read_text()) for name in EVENT_FILES]
    idle_in_a_row = 0
    for sequence in itertools.count(1):
        worker_id = f"worker-{number}#{sequence}"
        event = _as_worker(events[(number + sequence) % len(events)], worker_id)
        response = lambda_handler(event, _Context(worker_id, LAMBDA_TIMEOUT_SECONDS))
        result = json.loads(response["body"]) if "statusCode" in response else response
        if result["outcome"] in ("no_work", "batch_busy"):
            idle_in_a_row += 1
            if idle_in_a_row >= 3 and _queue_empty():
                return 0
            time.sleep(0.5)
        else:
            idle_in_a_row = 0
    return 0


def _as_worker(event: dict, worker_id: str) -> dict:
    """The event with workerId set, so the demo can say which process did what."""
    event = json.loads(json.dumps(event))
    if "requestContext" in event:
        raw = event["body"] or "{}"
        body = json.loads(
            base64.b64decode(raw) if event.get("isBase64Encoded") else raw
        )
        body["workerId"] = worker_id
        encoded = json.dumps(body)
        if event.get("isBase64Encoded"):
            encoded = base64.b64encode(encoded.encode()).decode()
        event["body"] = encoded
        event["requestContext"]["requestId"] = str(uuid.uuid4())
    elif "detail-type" in event:
        event["id"] = str(uuid.uuid4())
    else:
        event["workerId"] = worker_id
    return event


def _queue_empty() -> bool:
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        return conn.execute('SELECT NOT EXISTS (SELECT FROM "Tasks")').fetchone()[0]


if __name__ == "__main__":
    sys.exit(main())
