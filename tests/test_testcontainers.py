"""The queue on a PostgreSQL in a container: skipped where no Docker engine answers."""

import psycopg
import pytest

from queue_core import ConnectionHolder, Outcome, Worker, enqueue_many, migrate
from tests.support.containers import postgres_container
from tests.support.db import settings


@pytest.mark.slow
def test_queue_works_on_postgres_in_a_container():
    # GIVEN a PostgreSQL server in a fresh container (the test skips without Docker)
    with postgres_container() as url:
        # AND the schema migrated, and three tasks of batch A
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
            ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])

        # WHEN a worker runs
        seen: list[int] = []
        holder = ConnectionHolder(url)
        report = Worker(holder, settings(url), lambda task: seen.append(task.id)).run(
            "worker-1"
        )
        holder.discard()

    # THEN it drained the batch in order
    assert report.outcome == Outcome.DRAINED
    assert seen == ids
