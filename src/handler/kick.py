"""Starting workers without waiting for the next tick: asynchronous invocations of the
worker function (InvocationType "Event"), each with the direct-invoke JSON.

kick() is for producers: call it after the transaction that enqueued has committed, so
that the worker it starts can see the task. start_workers() is what the scheduled tick
uses to fan out. boto3 is imported on first use only: the idle tick never loads it.
"""

import json
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_client: Any = None


def kick(
    function_name: str,
    batch_id: str | None = None,
    *,
    client: Any = None,
) -> bool:
    """Start one worker now, for batch_id first if given; False if Lambda refused.

    The worker starts about as fast as Lambda accepts an asynchronous invoke and starts
    an environment (warm: milliseconds; cold: the handler's import time). A refused
    kick loses nothing: the task waits for the next tick instead.
    """
    payload = {} if batch_id is None else {"batchId": batch_id}
    return start_workers(function_name, [payload], client=client) == 1


def start_workers(
    function_name: str,
    payloads: Sequence[dict[str, Any]],
    *,
    client: Any = None,
) -> int:
    """Invoke function_name asynchronously once per payload; the number accepted."""
    if not payloads:
        return 0
    client = client or _lambda_client()
    from botocore.exceptions import BotoCoreError, ClientError

    started = 0
    for payload in payloads:
        try:
            response = client.invoke(
                FunctionName=function_name,
                InvocationType="Event",
                Payload=json.dumps(payload).encode(),
            )
        except (BotoCoreError, ClientError) as error:
            # Throttled or refused: the rest would be too; the next tick tries again.
            log.warning(
                "worker not started",
                extra={
                    "action": "worker_start_failed",
                    "error_class": type(error).__name__,
                    "started": started,
                },
            )
            break
        if response.get("StatusCode") == 202:
            started += 1
    log.info(
        "workers started",
        extra={"action": "workers_started", "started": started, "asked": len(payloads)},
    )
    return started


def _lambda_client() -> Any:
    global _client
    if _client is None:
        import boto3

        _client = boto3.client("lambda")
    return _client
