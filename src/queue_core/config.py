"""Settings of a worker, read once from the environment."""

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from queue_core.errors import ConfigurationError
from queue_core.validation import whole_number

DEFAULT_PROCESSOR = "queue_core.processor:simulated_work"

# What happens to a task whose attempts are used up: see ON_EXHAUSTED.
DEAD_LETTER = "dead-letter"
HALT = "halt"
EXHAUSTION_POLICIES = (DEAD_LETTER, HALT)


# DB_POOLER: "none", or "transaction" for PgBouncer or RDS Proxy in transaction mode.
POOLERS = ("none", "transaction")


@dataclass(frozen=True)
class Settings:
    database_url: str = field(repr=False)
    lease_seconds: float = 300.0
    safety_margin_seconds: float = 5.0
    task_budget_seconds: float = 5.0
    connect_timeout_seconds: int = 5
    max_payload_bytes: int = 256 * 1024
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    task_processor: str = DEFAULT_PROCESSOR
    # Workers the scheduled tick keeps running at most, itself included.
    max_concurrency: int = 1
    # Batches one invocation works in turn while time allows (the first one included).
    worker_max_batches: int = 1
    max_attempts: int = 5
    on_exhausted: str = DEAD_LETTER
    # Server-side bounds of every session, so that a frozen or vanished worker cannot
    # hold its locks for long. None: just past the lease (see transaction_seconds).
    transaction_timeout_seconds: float | None = None
    statement_timeout_seconds: float = 30.0
    lock_timeout_seconds: float = 10.0
    # Send the bounds as startup options; off for poolers that refuse them (PgBouncer),
    # in which case every task transaction sets them itself with SET LOCAL.
    session_options: bool = True
    # Behind a transaction-mode pooler (DB_POOLER=transaction) a session outlives no
    # transaction: no server-side prepared statements and no startup options then.
    pooled: bool = False

    @property
    def prepared_statements(self) -> bool:
        """Prepare the queue's statements on the server (they are planned once per
        connection instead of once per task), except behind a transaction pooler."""
        return not self.pooled

    @property
    def transaction_seconds(self) -> float:
        """How long a transaction may last: by default just past the lease, when its
        work could no longer commit anyway."""
        if self.transaction_timeout_seconds is not None:
            return self.transaction_timeout_seconds
        return self.lease_seconds + self.safety_margin_seconds

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        require_database_url: bool = True,
    ) -> "Settings":
        """require_database_url=False: the caller connects by other means (the Lambda
        handler's credentials from Secrets Manager or RDS IAM); database_url is then
        DATABASE_URL or empty."""
        env = os.environ if environ is None else environ
        url = env.get("DATABASE_URL", "").strip()
        if not url and require_database_url:
            raise ConfigurationError("DATABASE_URL is not set")
        return cls(
            database_url=url,
            lease_seconds=_positive(env, "LEASE_TIMEOUT_SECONDS", 300.0),
            safety_margin_seconds=_positive(env, "SAFETY_MARGIN_SECONDS", 5.0),
            task_budget_seconds=_positive(env, "TASK_BUDGET_SECONDS", 5.0),
            connect_timeout_seconds=math.ceil(
                _positive(env, "CONNECT_TIMEOUT_SECONDS", 5)
            ),
            max_payload_bytes=_whole(env, "MAX_PAYLOAD_BYTES", 256 * 1024),
            retry_base_seconds=_positive(env, "RETRY_BASE_SECONDS", 2.0),
            retry_max_seconds=_positive(env, "RETRY_MAX_SECONDS", 300.0),
            task_processor=env.get("TASK_PROCESSOR", "").strip() or DEFAULT_PROCESSOR,
            max_concurrency=_whole(env, "MAX_CONCURRENCY", 1),
            worker_max_batches=_whole(env, "WORKER_MAX_BATCHES", 1),
            max_attempts=_whole(env, "MAX_ATTEMPTS", 5),
            on_exhausted=_choice(env, "ON_EXHAUSTED", EXHAUSTION_POLICIES),
            transaction_timeout_seconds=_positive(
                env, "TRANSACTION_TIMEOUT_SECONDS", None
            ),
            statement_timeout_seconds=_positive(env, "STATEMENT_TIMEOUT_SECONDS", 30.0),
            lock_timeout_seconds=_positive(env, "LOCK_TIMEOUT_SECONDS", 10.0),
            session_options=(
                _choice(env, "DB_SESSION_OPTIONS", ("on", "off")) == "on"
                and _choice(env, "DB_POOLER", POOLERS) == "none"
            ),
            pooled=_choice(env, "DB_POOLER", POOLERS) == "transaction",
        )


def _positive(env, name: str, default):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(
            f"{name} must be a finite number greater than 0, got {raw!r}"
        )
    return value


def _whole(env, name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = whole_number(raw)
    if value is None or value < 1:
        raise ConfigurationError(
            f"{name} must be a whole number of at least 1, got {raw!r}"
        )
    return value


def _choice(env, name: str, choices: tuple[str, ...]) -> str:
    """The setting's value, one of choices; the first when unset."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return choices[0]
    if raw not in choices:
        raise ConfigurationError(
            f"{name} must be one of {', '.join(choices)}, got {raw!r}"
        )
    return raw
