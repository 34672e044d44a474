"""Fixtures on a real PostgreSQL: a migrated template built once per session, and a
fresh copy of it for every test that asks for a database.

The server is DATABASE_URL (which `make test` sets), else the embedded server, or, with
TEST_DATABASE=testcontainers, a new container (skipped when no Docker engine answers).
"""

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

# Before anything imports the handler: its Tracer reads this when it is created.
os.environ["POWERTOOLS_TRACE_DISABLED"] = "1"

from queue_core import migrate
from tests.support.containers import postgres_container
from tests.support.db import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "queue_test_template"

# Sessions running at once share the template: building it takes this advisory lock
# exclusively, copying it takes it shared, so no copy ever sees a half-built template.
_TEMPLATE_LOCK = 0x5155_5445
_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The server the tests run on: the URL of its maintenance database."""
    if os.environ.get("TEST_DATABASE", "").strip().lower() == "testcontainers":
        with postgres_container() as url:
            yield url
        return

    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        try:
            from localdev.embedded_pg import database_url

            url = database_url()
        except Exception as error:
            pytest.skip(
                "no database: DATABASE_URL is unset and the embedded PostgreSQL "
                f"server did not start ({type(error).__name__}: {error})"
            )
    yield url


@pytest.fixture(scope="session")
def template_database(postgres_url: str) -> str:
    """queue_test_template, built in this session with the migrations applied."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (_TEMPLATE_LOCK,))
        try:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(TEMPLATE)
                )
            )
            admin.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE))
            )
            with psycopg.connect(
                make_conninfo(postgres_url, dbname=TEMPLATE), autocommit=True
            ) as template:
                migrate(template)
        finally:
            admin.execute("SELECT pg_advisory_unlock(%s)", (_TEMPLATE_LOCK,))
    return TEMPLATE


@pytest.fixture
def db_url(postgres_url: str, template_database: str) -> Iterator[str]:
    """Conninfo of a fresh, migrated database of this test's own."""
    with _database(postgres_url, template_database) as url:
        yield url


@pytest.fixture
def empty_db_url(postgres_url: str) -> Iterator[str]:
    """Conninfo of a fresh database without the queue's schema."""
    with _database(postgres_url, "template0") as url:
        yield url


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


class _database:
    """Create a database from a template, and drop it (with its sessions) after."""

    def __init__(self, postgres_url: str, template: str) -> None:
        self._postgres_url = postgres_url
        self._template = template
        self._name = f"queue_test_{os.getpid()}_{next(_database_numbers)}"

    def __enter__(self) -> str:
        with psycopg.connect(self._postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_advisory_lock_shared(%s)", (_TEMPLATE_LOCK,))
            try:
                admin.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                        sql.Identifier(self._name), sql.Identifier(self._template)
                    )
                )
            finally:
                admin.execute("SELECT pg_advisory_unlock_shared(%s)", (_TEMPLATE_LOCK,))
        return make_conninfo(self._postgres_url, dbname=self._name)

    def __exit__(self, *_exc: object) -> None:
        with psycopg.connect(self._postgres_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self._name)
                )
            )


@pytest.fixture
def records_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the recording processors of this test write, in and out of process."""
    path = tmp_path / "records.jsonl"
    monkeypatch.setenv("RECORD_FILE", str(path))
    return path


@pytest.fixture
def handler_app(db_url: str, records_file: Path, monkeypatch: pytest.MonkeyPatch):
    """handler.app configured for the test's database, with its warm state reset."""
    environment = {
        "DATABASE_URL": db_url,
        "LEASE_TIMEOUT_SECONDS": "30",
        "TASK_BUDGET_SECONDS": "1",
        "SAFETY_MARGIN_SECONDS": "1",
        "TASK_PROCESSOR": "tests.support.processors:record",
        "RECORD_SLEEP_SECONDS": "0",
        "POWERTOOLS_TRACE_DISABLED": "1",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    import handler.app as app

    _reset_handler(app)
    yield app
    _reset_handler(app)


def _reset_handler(app) -> None:
    if app._connections is not None:
        app._connections.discard()
    app._connections = None
    app._settings = None


class WorkerProcesses:
    """Worker processes (tests/support/lambda_worker.py) started by one test.

    Their output goes to files beside the records, their reports to reports.jsonl.
    """

    def __init__(self, directory: Path, db_url: str, records_file: Path) -> None:
        self.directory = directory
        self.reports_file = directory / "reports.jsonl"
        self._environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
            "DATABASE_URL": db_url,
            "POWERTOOLS_TRACE_DISABLED": "1",
            "TASK_PROCESSOR": "tests.support.processors:record",
            "RECORD_FILE": str(records_file),
            "RECORD_SLEEP_SECONDS": "0",
            "LEASE_TIMEOUT_SECONDS": "30",
            "TASK_BUDGET_SECONDS": "1",
            "SAFETY_MARGIN_SECONDS": "1",
        }
        self._started: list[subprocess.Popen] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, wait_for_go: bool = False
    ) -> subprocess.Popen:
        number = len(self._started) + 1
        command = [sys.executable, "-m", "tests.support.lambda_worker"]
        command += ["--reports", str(self.reports_file), *args]
        if wait_for_go:
            command.append("--wait-for-go")
        with (
            open(self.directory / f"worker-{number}.out", "wb") as out,
            open(self.directory / f"worker-{number}.err", "wb") as err,
        ):
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env={**self._environment, **(env or {})},
                stdin=subprocess.PIPE if wait_for_go else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        process.number = number
        self._started.append(process)
        return process

    def release_together(self, processes: list[subprocess.Popen]) -> None:
        """Wait until every process started with wait_for_go is ready; let all go."""

        def all_ready() -> bool:
            for process in processes:
                if process.poll() is not None:
                    raise AssertionError(
                        f"worker {process.number} exited early:\n"
                        + self.output(process)
                    )
            return all(
                (self.directory / f"worker-{process.number}.out")
                .read_bytes()
                .startswith(b"ready")
                for process in processes
            )

        wait_until(all_ready, timeout=60, what="the worker processes to be ready")
        for process in processes:
            process.stdin.write(b"go\n")
            process.stdin.flush()

    def output(self, process: subprocess.Popen) -> str:
        """The end of a process's standard error, for failure messages."""
        err = (self.directory / f"worker-{process.number}.err").read_text(
            errors="replace"
        )
        return err[-3000:]

    def wait(self, process: subprocess.Popen, timeout: float) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {process.number} still running after {timeout}s:\n"
                + self.output(process)
            ) from None

    def stop_all(self) -> None:
        for process in self._started:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait(timeout=30)
            if process.stdin is not None:
                process.stdin.close()


@pytest.fixture
def worker_processes(
    tmp_path: Path, db_url: str, records_file: Path
) -> Iterator[WorkerProcesses]:
    processes = WorkerProcesses(tmp_path, db_url, records_file)
    try:
        yield processes
    finally:
        processes.stop_all()
