"""Connections to PostgreSQL: opened with a timeout, reused while warm, retried."""

import logging
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg import errors
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity import Retrying as _Retrying

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


def connect(
    conninfo: str, connect_timeout: int, application_name: str
) -> psycopg.Connection:
    """Open an autocommit connection; the queue issues its own BEGIN and COMMIT."""
    return psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=connect_timeout,
        application_name=application_name,
        # Prepared statements do not survive a transaction-mode pooler.
        prepare_threshold=None,
    )


class ConnectionHolder:
    """One connection kept across warm invocations, replaced when closed or broken."""

    def __init__(
        self,
        conninfo: ConninfoSource,
        connect_timeout: int = 5,
        application_name: str = "queue_core",
    ) -> None:
        """conninfo: a string, or a callable asked again for every new connection.

        A callable may also have forget(): it is called when a connection attempt
        fails, so that credentials it caches (a rotated password) are fetched anew.
        """
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._application_name = application_name
        self._connection: psycopg.Connection | None = None
        self.connects = 0

    def get(self) -> psycopg.Connection:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        self._connection = retrying(lambda: self._open())
        return self._connection

    def _open(self) -> psycopg.Connection:
        log.debug("connecting to the database", extra={"action": "db_connect"})
        source = self._conninfo
        conninfo = source() if callable(source) else source
        try:
            connection = connect(
                conninfo, self._connect_timeout, self._application_name
            )
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
