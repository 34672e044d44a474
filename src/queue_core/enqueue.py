"""Adding tasks to batches, on the caller's own connection and transaction."""

from collections.abc import Iterable
from typing import Any

import psycopg

from queue_core.errors import InvalidInput
from queue_core.queries import query
from queue_core.validation import check_batch_id, encode_payload

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024


def enqueue(
    conn: psycopg.Connection,
    batch_id: str,
    payload: Any = None,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> int:
    """Append one task to a batch; returns its id. Commits only in autocommit."""
    return enqueue_many(
        conn, [(batch_id, payload)], max_payload_bytes=max_payload_bytes
    )[0]


def enqueue_many(
    conn: psycopg.Connection,
    tasks: Iterable[tuple[str, Any]],
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[int]:
    """Append (batch_id, payload) pairs in order, in one statement; returns their ids.

    Every pair is checked before anything is written, so bad input changes nothing.
    """
    batch_ids: list[str] = []
    payloads: list[str] = []
    for position, (batch_id, payload) in enumerate(tasks):
        batch_ids.append(check_batch_id(batch_id, f"tasks[{position}].batchId"))
        payload_field = f"tasks[{position}].payload"
        payloads.append(encode_payload(payload, max_payload_bytes, payload_field))
    if not batch_ids:
        raise InvalidInput("tasks", "must hold at least one task")

    rows = conn.execute(
        query("enqueue_tasks"), {"batch_ids": batch_ids, "payloads": payloads}
    ).fetchall()
    return [row[0] for row in rows]
