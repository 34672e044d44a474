"""One role of the lost-marker race test, run as its own process:

    python -m tests.support.marker_race enqueuer|worker|checker SECONDS SEED

enqueuer: short transactions that append one task to a few shared batches, sometimes
waiting before the commit, sometimes rolling back, some in REPEATABLE READ.
worker: the queue's own worker, claiming and draining as fast as it can.
checker: in one statement at a time, counts batches that hold a committed task while
their marker says "certainly empty". Each prints one JSON line at the end.
"""

import json
import os
import random
import sys
import time

import psycopg
from psycopg import errors

from queue_core import ConnectionHolder, Worker, enqueue
from tests.support.db import settings

BATCHES = ["race-A", "race-B", "race-C"]

LOST_MARKERS = """
SELECT count(*)
FROM "BatchLocks" lease
WHERE NOT lease."MaybePending"
  AND EXISTS (SELECT FROM "Tasks" task WHERE task."BatchId" = lease."BatchId")
"""


def enqueuer(url: str, deadline: float, chooser: random.Random) -> dict:
    committed = rolled_back = conflicts = 0
    repeatable = chooser.random() < 0.3
    with psycopg.connect(url) as conn:
        if repeatable:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        while time.monotonic() < deadline:
            try:
                conn.execute("SELECT 1")  # the transaction's snapshot starts here
                time.sleep(chooser.uniform(0, 0.002))
                enqueue(conn, chooser.choice(BATCHES), {"n": committed})
                time.sleep(chooser.uniform(0, 0.003))
                if chooser.random() < 0.15:
                    conn.rollback()
                    rolled_back += 1
                else:
                    conn.commit()
                    committed += 1
            except (errors.SerializationFailure, errors.DeadlockDetected):
                conn.rollback()
                conflicts += 1
    return {
        "committed": committed,
        "rolled_back": rolled_back,
        "conflicts": conflicts,
        "repeatable_read": repeatable,
    }


def worker(url: str, deadline: float, chooser: random.Random) -> dict:
    holder = ConnectionHolder(url)
    queue_worker = Worker(
        holder,
        settings(url, TASK_PROCESSOR="queue_core.processor:no_work"),
    )
    completed = 0
    while time.monotonic() < deadline:
        report = queue_worker.run(f"race-{os.getpid()}")
        completed += len(report.completed)
        if not report.completed:
            time.sleep(chooser.uniform(0, 0.002))
    holder.discard()
    return {"completed": completed}


def checker(url: str, deadline: float, _chooser: random.Random) -> dict:
    checks = lost = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            lost += conn.execute(LOST_MARKERS).fetchone()[0]
            checks += 1
    return {"checks": checks, "lost": lost}


ROLES = {"enqueuer": enqueuer, "worker": worker, "checker": checker}


def main(argv: list[str]) -> int:
    role, seconds, seed = argv[0], float(argv[1]), int(argv[2])
    deadline = time.monotonic() + seconds
    result = ROLES[role](os.environ["DATABASE_URL"], deadline, random.Random(seed))
    print(json.dumps({"role": role, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
