"""Versioned schema migrations from sql/migrations, applied in order, once each.

Safe to run twice and from two processes at once: the whole run holds a transaction-
level advisory lock, and each file is recorded in "QueueMigrations" in the same
transaction.
"""

import logging
from pathlib import Path

import psycopg

from queue_core.queries import sql_dir

log = logging.getLogger(__name__)

# Any constant: it names the lock that serializes migration runs.
_MIGRATION_LOCK_KEY = 0x5155_4555


def migration_files() -> list[Path]:
    return sorted((sql_dir() / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations not yet recorded; returns the versions applied now."""
    applied_now: list[str] = []
    with conn.transaction():
        # A migration may rewrite a large table: the statement timeout (a startup
        # option of the connection) does not apply here; lock_timeout still does.
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS "QueueMigrations" (
                "Version" text PRIMARY KEY,
                "AppliedAt" timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            row[0] for row in conn.execute('SELECT "Version" FROM "QueueMigrations"')
        }
        for path in migration_files():
            version = path.stem
            if version in done:
                continue
            log.info(
                "applying migration", extra={"action": "migrate", "version": version}
            )
            conn.execute(path.read_text().encode())
            conn.execute(
                'INSERT INTO "QueueMigrations" ("Version") VALUES (%s)', (version,)
            )
            applied_now.append(version)
    return applied_now
