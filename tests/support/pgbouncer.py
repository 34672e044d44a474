"""A real PgBouncer in transaction pooling mode, in front of the test server.

Debian's pgbouncer package is installed when it is missing and the tests run as root
with apt-get (as CI does); otherwise the tests that need it are skipped, saying why.
It listens on 127.0.0.1 on a free port, forwards every database name to the test
server, and lends fewer server connections than it has clients, so that consecutive
transactions of one client really run on different server sessions.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"]
)
# Server connections per database: fewer than the workers of the tests.
POOL_SIZE = 3


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer", path=SEARCH_PATH)


def install_pgbouncer() -> str:
    """The path of pgbouncer, installed from Debian's packages if needed; skips the
    test when that cannot be done here."""
    found = find_pgbouncer()
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("pgbouncer is not installed, and installing it needs root")
    if not shutil.which("apt-get"):
        pytest.skip("pgbouncer is not installed, and there is no apt-get to install it")

    command = [
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        "pgbouncer",
    ]
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        # A machine that never fetched the package lists knows no pgbouncer yet.
        subprocess.run(
            ["apt-get", "update", "-o", "DPkg::Lock::Timeout=300"],
            env=environment,
            capture_output=True,
        )
        result = subprocess.run(
            command, env=environment, capture_output=True, text=True
        )
    found = find_pgbouncer()
    if result.returncode != 0 or not found:
        pytest.skip(
            "pgbouncer could not be installed with apt-get: "
            + (result.stderr.strip().splitlines() or ["no output"])[-1]
        )
    return found


class PgBouncer:
    """A pgbouncer process of the tests' own, and the URLs that reach through it."""

    def __init__(self, binary: str, backend_url: str) -> None:
        self._binary = binary
        self._backend = conninfo_to_dict(backend_url)
        self._user = str(self._backend.get("user") or "postgres")
        self._run_as = _unprivileged_user(self._backend)
        self.directory = Path(tempfile.mkdtemp(prefix="queue-pgbouncer-"))
        self.port = _free_port()
        self._process: subprocess.Popen | None = None

    def url(self, dbname: str) -> str:
        """A conninfo that reaches dbname through the pooler."""
        return make_conninfo(
            host="127.0.0.1", port=self.port, dbname=dbname, user=self._user
        )

    def start(self) -> None:
        self._write_config()
        command = [self._binary]
        if self._run_as is not None:
            # pgbouncer refuses to run as root.
            command += ["-u", self._run_as]
        command.append(str(self.directory / "pgbouncer.ini"))
        with open(self.directory / "stdout.log", "wb") as out:
            self._process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_until_it_answers()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def admin(self, command: str) -> list[dict]:
        """The rows of an admin console command, such as SHOW POOLS."""
        with psycopg.connect(self.url("pgbouncer"), autocommit=True) as console:
            cursor = console.execute(command)
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def log(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-3000:]
            for path in (
                self.directory / "pgbouncer.log",
                self.directory / "stdout.log",
            )
            if path.exists()
        )

    def _write_config(self) -> None:
        backend = {
            key: self._backend[key]
            for key in ("host", "port", "user", "password")
            if self._backend.get(key)
        }
        backend.setdefault("user", self._user)
        backend_text = " ".join(f"{key}={value}" for key, value in backend.items())
        (self.directory / "userlist.txt").write_text(f'"{self._user}" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = {backend_text}",
                    "",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.directory / 'userlist.txt'}",
                    f"admin_users = {self._user}",
                    "pool_mode = transaction",
                    f"default_pool_size = {POOL_SIZE}",
                    "max_client_conn = 200",
                    f"logfile = {self.directory / 'pgbouncer.log'}",
                    "",
                ]
            )
        )
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            for path in [self.directory, *self.directory.iterdir()]:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _wait_until_it_answers(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log()}")
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer did not answer within 30 s:\n{self.log()}"
                    ) from None
                time.sleep(0.1)


@contextmanager
def running_pgbouncer(postgres_url: str) -> Iterator[PgBouncer]:
    """A running PgBouncer in transaction mode in front of the tests' server."""
    bouncer = PgBouncer(install_pgbouncer(), postgres_url)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()


def _unprivileged_user(backend: dict) -> str | None:
    """Who pgbouncer runs as: None (ourselves) unless we are root; then the owner of
    the server's socket directory, which may enter it, or nobody."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    host = str(backend.get("host") or "")
    if host.startswith("/") and os.path.isdir(host):
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
        if owner != "root":
            return owner
    return "nobody"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
