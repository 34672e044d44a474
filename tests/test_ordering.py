"""FIFO inside a batch and one owner per batch, with ten Lambda workers at once."""

import collections
import itertools

import pytest

from queue_core import enqueue_many
from tests.support.db import pending_ids, table_state
from tests.support.processors import read_records

BATCHES = ["A", "B", "C", "tenant-42:orders.v2"]
TASKS_PER_BATCH = 10
WORKERS = 10
# The real-format events, as the schedule, the schedule with Input, a direct invoke and
# the Function URL deliver them; each process starts at a different one.
EVENTS = [
    "schedule-default",
    "schedule-input-batch-b",
    "direct-invoke",
    "function-url-process-task",
]
CALM_OUTCOMES = {"drained", "time_up", "no_work", "batch_busy"}


@pytest.mark.slow
def test_ten_workers_complete_every_task_once_in_order_one_owner_per_batch(
    conn, worker_processes, records_file
):
    # GIVEN 40 tasks over four batches, enqueued interleaved so that their ids mix
    ids = enqueue_many(
        conn,
        [(batch, {"n": n}) for n in range(TASKS_PER_BATCH) for batch in BATCHES],
    )
    expected = {
        batch: ids[index :: len(BATCHES)] for index, batch in enumerate(BATCHES)
    }

    # WHEN ten worker processes call the handler in a loop until the queue is empty,
    # each invocation with little enough remaining time that batches change hands often
    processes = []
    for number in range(WORKERS):
        rotation = itertools.islice(
            itertools.cycle(EVENTS), number, number + len(EVENTS)
        )
        processes.append(
            worker_processes.start(
                "--events",
                ",".join(rotation),
                "--until-empty",
                "--remaining-seconds",
                "0.22-0.35",
                "--deadline-seconds",
                "90",
                "--seed",
                str(number),
                env={
                    "TASK_BUDGET_SECONDS": "0.1",
                    "SAFETY_MARGIN_SECONDS": "0.1",
                    "RECORD_SLEEP_SECONDS": "0.03",
                },
                wait_for_go=True,
            )
        )
    worker_processes.release_together(processes)
    for process in processes:
        code = worker_processes.wait(process, timeout=120)
        assert code == 0, worker_processes.output(process)

    # THEN the queue is empty
    assert pending_ids(conn) == []
    assert table_state(conn)["tasks"] == []

    # AND the reports say every task was completed exactly once
    reports = read_records(worker_processes.reports_file)
    completed = collections.Counter(
        task_id for report in reports for task_id in report["completed"]
    )
    assert completed == collections.Counter(ids)
    assert {report["outcome"] for report in reports} <= CALM_OUTCOMES

    # AND each task was started once, on its first attempt
    records = read_records(records_file)
    starts = [record for record in records if record["event"] == "start"]
    assert sorted(record["task_id"] for record in starts) == sorted(ids)
    assert {record["attempt"] for record in starts} == {1}

    for batch in BATCHES:
        lines = [record for record in records if record["batch_id"] == batch]
        batch_starts, batch_ends = lines[0::2], lines[1::2]

        # AND inside each batch, in the order the writes happened, every start is
        # followed by the end of the same task before anything else of the batch starts:
        # no two workers ever processed the batch at the same time
        assert [line["event"] for line in lines] == ["start", "end"] * TASKS_PER_BATCH
        assert [line["task_id"] for line in batch_starts] == [
            line["task_id"] for line in batch_ends
        ]
        assert all(
            start["pid"] == end["pid"]
            for start, end in zip(batch_starts, batch_ends, strict=True)
        )

        # AND by the clock too, each task started after the previous one ended
        for previous_end, next_start in zip(batch_ends, batch_starts[1:], strict=False):
            assert next_start["ts"] >= previous_end["ts"], (
                batch,
                previous_end,
                next_start,
            )

        # AND the batch was worked in "Id" order, which is the order of enqueueing
        assert [line["task_id"] for line in batch_starts] == expected[batch]

    # AND the run really was concurrent: several processes worked, batches changed hands
    assert len({record["pid"] for record in starts}) > 1
    owners = {(record["batch_id"], record["pid"]) for record in starts}
    assert len(owners) > len(BATCHES)
