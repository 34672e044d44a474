"""The migrations adopt a database of the original schema, its tasks kept in order."""

import psycopg

from queue_core import ConnectionHolder, Outcome, Worker, migrate
from tests.support import db

ORIGINAL_SCHEMA = """
CREATE TABLE "BatchLocks" (
    "BatchId"  varchar(64) PRIMARY KEY,
    "LockedBy" text NOT NULL,
    "LockedAt" timestamptz NOT NULL
);
CREATE TABLE "Tasks" (
    "Id"      serial PRIMARY KEY,
    "BatchId" varchar(64) NOT NULL
);
"""


def test_migrate_adopts_the_original_schema_and_its_pending_tasks(empty_db_url):
    # GIVEN a database of the original schema: a 32-bit serial id, a lease row left by a
    # long-gone worker, and a batch with tasks but no lease row at all
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(ORIGINAL_SCHEMA)
        conn.execute(
            """INSERT INTO "BatchLocks"
               VALUES ('A', 'old-worker', now() - interval '1 day')"""
        )
        ids = [
            conn.execute(
                'INSERT INTO "Tasks" ("BatchId") VALUES (%s) RETURNING "Id"', (batch,)
            ).fetchone()[0]
            for batch in ["A", "B", "A", "B"]
        ]

        # WHEN it is migrated, twice
        assert migrate(conn) != []
        assert migrate(conn) == []

        # THEN ids are 64-bit, every batch has its lease row, every task is pending
        assert conn.execute(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'Tasks' AND column_name = 'Id'"
        ).fetchone() == ("bigint",)
        assert conn.execute(
            "SELECT data_type FROM information_schema.sequences"
        ).fetchall() == [("bigint",)]
        assert [row[0] for row in db.table_state(conn)["leases"]] == ["A", "B"]
        assert db.pending_ids(conn) == ids
        assert db.task(conn, ids[0])["Payload"] == {}

        # AND new tasks still get new ids
        assert conn.execute(
            """INSERT INTO "Tasks" ("BatchId") VALUES ('B') RETURNING "Id" """
        ).fetchone()[0] > max(ids)

    # WHEN workers run until the queue is empty
    seen: list[int] = []
    holder = ConnectionHolder(empty_db_url)
    worker = Worker(holder, db.settings(empty_db_url), lambda t: seen.append(t.id))
    reports = [worker.run(f"worker-{n}") for n in range(3)]
    holder.discard()

    # THEN every batch was worked in its original order, the stale lease taken over
    assert [r.outcome for r in reports] == [
        Outcome.DRAINED,
        Outcome.DRAINED,
        Outcome.NO_WORK,
    ]
    by_batch = {r.batch_id: [t.task_id for t in r.completed] for r in reports[:2]}
    assert by_batch["A"] == [ids[0], ids[2]]
    assert by_batch["B"][:2] == [ids[1], ids[3]]
    assert "old-worker" in {r.taken_over_from for r in reports}


def test_migrate_refuses_batch_names_outside_the_rule_naming_them(empty_db_url):
    # GIVEN a database of the original schema with batches the name rule refuses
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(ORIGINAL_SCHEMA)
        for batch in ["ok", "a b", "A ", ""]:
            conn.execute('INSERT INTO "Tasks" ("BatchId") VALUES (%s)', (batch,))
        before = db_shape(conn)

        # WHEN it is migrated
        try:
            migrate(conn)
        except psycopg.errors.CheckViolation as error:
            refused = error
        else:
            raise AssertionError("the migration went through")

        # THEN the error names each bad batch and what to do, and nothing changed
        assert "3 batch name(s) break the rule" in str(refused)
        assert "'', 'A ', 'a b'" in str(refused)
        assert "Rename those batches" in refused.diag.message_hint
        assert db_shape(conn) == before


def db_shape(conn: psycopg.Connection) -> list[tuple]:
    """Every table and column, and every task."""
    columns = conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY 1, 2"
    ).fetchall()
    return columns + conn.execute('SELECT * FROM "Tasks" ORDER BY 1').fetchall()
