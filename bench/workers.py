"""The drain loops the benchmark times, each run in its own process.

Every loop gets its connection first, waits at a barrier so that all processes start
together, drains, and returns (start, end, tasks done). Zero-work tasks.
"""

import asyncio
import os
import time
from typing import Any

import psycopg

RAW_LOCK_HEAD = """
SELECT "Id" FROM "Tasks" WHERE "BatchId" = %s ORDER BY "Id" LIMIT 1 FOR UPDATE
"""
RAW_DELETE = 'DELETE FROM "Tasks" WHERE "Id" = %s'


def project(url: str, number: int, workers: int, batches: list[str], barrier) -> tuple:
    """The queue's own worker loop, as the handler runs it: claim, drain, repeat."""
    from queue_core import ConnectionHolder, Outcome, Settings, Worker

    settings = Settings.from_env(
        {"DATABASE_URL": url, "TASK_PROCESSOR": "queue_core.processor:no_work"}
    )
    holder = ConnectionHolder.for_settings(settings, application_name="bench-project")
    holder.get()
    worker = Worker(holder, settings)
    done = 0
    barrier.wait()
    start = time.perf_counter()
    idle_claims = 0
    while idle_claims < 3:
        report = worker.run(f"bench-{number}")
        done += len(report.completed)
        # Another process may hold the last batches: look again a few times.
        idle_claims = idle_claims + 1 if report.outcome == Outcome.NO_WORK else 0
    end = time.perf_counter()
    holder.discard()
    return start, end, done


def project_audit(
    url: str, number: int, workers: int, batches: list[str], barrier
) -> tuple:
    """The worker loop with its audit trail on, as deployed: a Powertools JSON line
    per completion (and per claim and release), written to /dev/null, not CloudWatch."""
    import logging

    from aws_lambda_powertools import Logger
    from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers

    import queue_core.worker  # noqa: F401 (its logger must exist to be configured)

    sink = open(os.devnull, "w")  # noqa: SIM115 (open while the process lives)
    logger = Logger(service="bench", logger_handler=logging.StreamHandler(sink))
    copy_config_to_registered_loggers(source_logger=logger, include={"queue_core"})
    return project(url, number, workers, batches, barrier)


def raw(url: str, number: int, workers: int, batches: list[str], barrier) -> tuple:
    """The least a strict-FIFO worker does: lock the head FOR UPDATE, delete, commit.

    Batches are split statically between the processes (no lease needed); per task
    two pipelined round trips: BEGIN + lock head, then DELETE + COMMIT.
    """
    mine = batches[number::workers]
    done = 0
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        barrier.wait()
        start = time.perf_counter()
        for batch in mine:
            while True:
                with conn.pipeline():
                    conn.execute("BEGIN")
                    head = conn.execute(RAW_LOCK_HEAD, (batch,))
                row = head.fetchone()
                if row is None:
                    conn.execute("COMMIT")
                    break
                with conn.pipeline():
                    conn.execute(RAW_DELETE, row)
                    conn.execute("COMMIT")
                done += 1
        end = time.perf_counter()
    return start, end, done


def pgqueuer_worker(
    url: str, number: int, workers: int, batches: list[str], barrier
) -> tuple:
    """pgqueuer's QueueManager in drain mode, its defaults otherwise (batch_size 10)."""
    return asyncio.run(_pgqueuer(url, barrier))


async def _pgqueuer(url: str, barrier) -> tuple:
    from pgqueuer import PsycopgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    done = 0
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    manager = QueueManager(Queries(PsycopgDriver(conn)))
    # Its 0.1 s pause between polls while work is eligible would dominate a drain of
    # jobs enqueued before it started (no NOTIFY arrives): re-poll at once instead.
    manager.min_dequeue_poll_interval = _seconds(0)

    @manager.entrypoint("noop")
    async def noop(job: Any) -> None:
        nonlocal done
        done += 1

    await asyncio.to_thread(barrier.wait)
    start = time.perf_counter()
    await manager.run(
        dequeue_timeout=_seconds(1),
        mode=QueueExecutionMode.drain,
        log_aggregation_interval=_seconds(0),
    )
    end = time.perf_counter()
    await conn.close()
    return start, end, done


def _seconds(value: float):
    from datetime import timedelta

    return timedelta(seconds=value)


def procrastinate_worker(
    url: str, number: int, workers: int, batches: list[str], barrier
) -> tuple:
    """A procrastinate worker (concurrency 1) that stops when the queue is empty."""
    return asyncio.run(_procrastinate(url, barrier))


def procrastinate_app(url: str):
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=url, kwargs={"prepare_threshold": None}
        )
    )
    app.task(name="noop", pass_context=False)(_noop)
    return app


def _noop(**_kwargs: Any) -> None:
    return None


async def _procrastinate(url: str, barrier) -> tuple:
    import logging

    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    app = procrastinate_app(url)
    async with app.open_async():
        await asyncio.to_thread(barrier.wait)
        start = time.perf_counter()
        await app.run_worker_async(
            wait=False,
            concurrency=1,
            install_signal_handlers=False,
            listen_notify=False,
        )
        end = time.perf_counter()
        done = await _procrastinate_done(app)
    return start, end, done


async def _procrastinate_done(app) -> int:
    rows = await app.connector.execute_query_all_async(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"
    )
    return rows[0]["n"]


LOOPS = {
    "project": project,
    "project-audit": project_audit,
    "raw": raw,
    "pgqueuer": pgqueuer_worker,
    "procrastinate": procrastinate_worker,
    "procrastinate-lock": procrastinate_worker,
}


def project_events(
    url: str, number: int, workers: int, batches: list[str], barrier
) -> tuple:
    """The project's loop, also returning (time, tasks) after each batch worked."""
    from queue_core import ConnectionHolder, Outcome, Settings, Worker

    settings = Settings.from_env(
        {"DATABASE_URL": url, "TASK_PROCESSOR": "queue_core.processor:no_work"}
    )
    holder = ConnectionHolder.for_settings(settings, application_name="bench-sustained")
    holder.get()
    worker = Worker(holder, settings)
    events: list[tuple[float, int]] = []
    barrier.wait()
    start = time.perf_counter()
    idle_claims = 0
    while idle_claims < 3:
        report = worker.run(f"sustained-{number}")
        if report.completed:
            events.append((time.perf_counter(), len(report.completed)))
        idle_claims = idle_claims + 1 if report.outcome == Outcome.NO_WORK else 0
    end = time.perf_counter()
    holder.discard()
    return start, end, sum(n for _, n in events), events


LOOPS["project-events"] = project_events


def run_child(loop, url, number, workers, batches, barrier, results) -> None:
    """A process's entry point: run one loop, send (ok, result or traceback) back."""
    import traceback

    try:
        results.put((True, LOOPS[loop](url, number, workers, batches, barrier)))
    except BaseException:
        barrier.abort()
        results.put((False, traceback.format_exc()))
