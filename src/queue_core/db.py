"""Connections to PostgreSQL: opened with a timeout, reused while warm, retried."""

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity import Retrying as _Retrying

from queue_core.config import Settings
from queue_core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which the same work can simply be tried again on a sound connection.
_TRANSIENT = (
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.AdminShutdown,
    errors.CrashShutdown,
    errors.CannotConnectNow,
    errors.LockNotAvailable,
    errors.QueryCanceled,
    errors.IdleInTransactionSessionTimeout,
    errors.TransactionTimeout,
)


def is_transient(error: BaseException) -> bool:
    """True for errors worth a retry: lost connections, conflicts, timeouts."""
    if isinstance(error, _TRANSIENT):
        return True
    # A lost or refused connection has no SQLSTATE of its own in libpq.
    return isinstance(error, psycopg.OperationalError) and error.sqlstate is None


# A connection string, or a callable giving one for each new connection (credentials
# that expire, such as RDS IAM tokens, must be fresh at connect time).
ConninfoSource = str | Callable[[], str]

# The first major version with transaction_timeout (as server_version_num).
TRANSACTION_TIMEOUT_SINCE = 170000


def server_bounds(
    settings: Settings, *, transaction_timeout: bool = True
) -> dict[str, str]:
    """The server-side limits of a worker's sessions, in milliseconds.

    A frozen or vanished client cannot then hold its locks for long: the server ends
    its session once its transaction has lasted past the lease. transaction_timeout
    (PostgreSQL 17+) is the bound that holds: idle_in_transaction_session_timeout is
    kept for older servers, but its timer stops at the Flush message that ends every
    psycopg pipeline, so it only bounds transactions idle after a plain statement.
    """
    # TODO: on PostgreSQL < 17 nothing ends the task transaction of a worker frozen
    # mid-task (its process stopped but alive), because psycopg ends each pipeline
    # with a Flush message; a pipeline ending in Sync (psycopg) or a timer re-armed
    # after Flush (PostgreSQL) would lift it. Dead clients are still cut off by TCP.
    transaction_ms = _ms(settings.transaction_seconds)
    bounds = {
        "idle_in_transaction_session_timeout": transaction_ms,
        "statement_timeout": _ms(settings.statement_timeout_seconds),
        "lock_timeout": _ms(settings.lock_timeout_seconds),
    }
    if transaction_timeout:
        bounds["transaction_timeout"] = transaction_ms
    return bounds


def transaction_bounds(settings: Settings) -> dict[str, str]:
    """The same limits, as parameters of the bound_transaction query."""
    bounds = server_bounds(settings)
    return {
        "transaction_ms": bounds["transaction_timeout"],
        "statement_ms": bounds["statement_timeout"],
        "lock_ms": bounds["lock_timeout"],
    }


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def connect(
    conninfo: str,
    connect_timeout: int,
    application_name: str,
    session_settings: Mapping[str, str] | None = None,
    prepare: bool = False,
) -> psycopg.Connection:
    """Open an autocommit connection; the queue issues its own BEGIN and COMMIT.

    session_settings are sent as startup options (no SET statement, no round trip),
    after any options the conninfo already carries.
    """
    extra: dict[str, object] = {}
    if session_settings:
        given = conninfo_to_dict(conninfo).get("options") or ""
        ours = " ".join(
            f"-c {name}={value}" for name, value in session_settings.items()
        )
        extra["options"] = f"{given} {ours}".strip()
    return psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=connect_timeout,
        application_name=application_name,
        # Prepared at first use (planning a query costs more than running it), unless
        # behind a transaction-mode pooler, where they do not survive the transaction.
        prepare_threshold=0 if prepare else None,
        **extra,
    )


class ConnectionHolder:
    """One connection kept across warm invocations, replaced when closed or broken."""

    def __init__(
        self,
        conninfo: ConninfoSource,
        connect_timeout: int = 5,
        application_name: str = "queue_core",
        session_settings: Mapping[str, str] | None = None,
        prepare: bool = False,
    ) -> None:
        """conninfo: a string, or a callable asked again for every new connection.

        A callable may also have forget(): it is called when a connection attempt
        fails, so that credentials it caches (a rotated password) are fetched anew.
        """
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._application_name = application_name
        self._session_settings = dict(session_settings or {})
        self._prepare = prepare
        self._server_version: int | None = None
        self._connection: psycopg.Connection | None = None
        self.connects = 0

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        application_name: str = "queue_core",
        conninfo: ConninfoSource | None = None,
    ) -> "ConnectionHolder":
        """A holder whose sessions carry the server-side bounds, when settings allow.

        conninfo: where connections go, when not settings.database_url (credentials).
        """
        return cls(
            conninfo if conninfo is not None else settings.database_url,
            connect_timeout=settings.connect_timeout_seconds,
            application_name=application_name,
            session_settings=(
                server_bounds(settings) if settings.session_options else None
            ),
            prepare=settings.prepared_statements,
        )

    def get(self) -> psycopg.Connection:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        self._connection = retrying(lambda: self._open())
        return self._connection

    def _open(self) -> psycopg.Connection:
        log.debug("connecting to the database", extra={"action": "db_connect"})
        source = self._conninfo
        wanted = self._session_settings
        if self._server_version is not None and (
            self._server_version < TRANSACTION_TIMEOUT_SINCE
        ):
            wanted = _without_transaction_timeout(wanted)
        try:
            try:
                connection = connect(
                    _conninfo(source),
                    self._connect_timeout,
                    self._application_name,
                    wanted,
                    self._prepare,
                )
            except psycopg.OperationalError as error:
                # A server older than 17 refuses transaction_timeout at startup, and
                # says so only in the text of its FATAL message (no SQLSTATE reaches
                # libpq's connection error). Ask once, remember, connect without it.
                if "transaction_timeout" not in wanted or (
                    "transaction_timeout" not in str(error)
                ):
                    raise
                connection = connect(
                    _conninfo(source),
                    self._connect_timeout,
                    self._application_name,
                    _without_transaction_timeout(wanted),
                    self._prepare,
                )
            self._server_version = connection.info.server_version
        except psycopg.OperationalError:
            forget = getattr(source, "forget", None)
            if forget is not None:
                forget()
            raise
        self.connects += 1
        return connection

    def discard(self) -> None:
        """Close the connection so that the next get() opens a new one."""
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg.Error:
                log.warning("closing a broken connection failed", exc_info=True)
        self._connection = None

    def discard_if_broken(self) -> None:
        if self._connection is not None and (
            self._connection.broken or self._connection.closed
        ):
            self.discard()


def retrying(
    step: Callable[[], T],
    attempts: int = 4,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run a database step; retry transient errors with exponential backoff, jitter."""

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "transient database error, retrying",
            extra={
                "action": "db_retry",
                "attempt": state.attempt_number,
                "error_class": type(error).__name__,
            },
        )
        if on_retry is not None and error is not None:
            on_retry(error)

    retryer = _Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
        stop=stop_after_attempt(attempts),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retryer(step)
    except psycopg.OperationalError as error:
        if is_transient(error) and error.sqlstate is None:
            raise DatabaseUnavailable(
                f"database unreachable: {type(error).__name__}"
            ) from error
        raise


def _conninfo(source: ConninfoSource) -> str:
    return source() if callable(source) else source


def _without_transaction_timeout(settings: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in settings.items() if k != "transaction_timeout"}
