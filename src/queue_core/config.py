"""Settings of a worker, read once from the environment."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from queue_core.errors import ConfigurationError

DEFAULT_PROCESSOR = "queue_core.processor:simulated_work"


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
            connect_timeout_seconds=int(_positive(env, "CONNECT_TIMEOUT_SECONDS", 5)),
            max_payload_bytes=int(_positive(env, "MAX_PAYLOAD_BYTES", 256 * 1024)),
            retry_base_seconds=_positive(env, "RETRY_BASE_SECONDS", 2.0),
            retry_max_seconds=_positive(env, "RETRY_MAX_SECONDS", 300.0),
            task_processor=env.get("TASK_PROCESSOR", "").strip() or DEFAULT_PROCESSOR,
            max_concurrency=int(_positive(env, "MAX_CONCURRENCY", 1)),
            worker_max_batches=int(_positive(env, "WORKER_MAX_BATCHES", 1)),
        )


def _positive(env, name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigurationError(f"{name} must be greater than 0, got {raw!r}")
    return value
