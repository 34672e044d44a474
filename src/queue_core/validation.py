"""The rules every door of the queue applies to batch names and payloads."""

import json
import re
from typing import Any

from queue_core.errors import InvalidInput

BATCH_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
BATCH_ID_RULE = "must be 1-64 characters of letters, digits and - _ . :"
_BATCH_ID = re.compile(BATCH_ID_PATTERN)

MAX_PAYLOAD_DEPTH = 32


def check_batch_id(batch_id: object, field: str = "batchId") -> str:
    """Return the batch id if it is a valid name, else raise InvalidInput."""
    if not isinstance(batch_id, str):
        raise InvalidInput(field, f"must be a string, got {type(batch_id).__name__}")
    if not _BATCH_ID.fullmatch(batch_id):
        raise InvalidInput(field, BATCH_ID_RULE)
    return batch_id


def encode_payload(payload: Any, max_bytes: int, field: str = "payload") -> str:
    """The JSON text stored in "Payload", after checking the payload's limits."""
    try:
        text = json.dumps(
            payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as error:
        raise InvalidInput(field, f"must be JSON-serializable ({error})") from None
    except RecursionError:
        raise InvalidInput(
            field, f"must nest at most {MAX_PAYLOAD_DEPTH} levels"
        ) from None

    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(
            field, "must be valid Unicode (lone surrogate found)"
        ) from None
    if size > max_bytes:
        raise InvalidInput(
            field, f"must be at most {max_bytes} bytes as JSON, got {size}"
        )
    depth, has_nul = _inspect(payload)
    if has_nul:
        raise InvalidInput(
            field, "must not contain NUL characters (PostgreSQL rejects them)"
        )
    if depth > MAX_PAYLOAD_DEPTH:
        raise InvalidInput(field, f"must nest at most {MAX_PAYLOAD_DEPTH} levels")
    return text


def _inspect(value: Any) -> tuple[int, bool]:
    """How deep the containers nest, and whether any key or string holds a NUL."""
    deepest = 0
    has_nul = False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            has_nul = has_nul or "\x00" in item
        elif isinstance(item, dict):
            deepest = max(deepest, depth)
            has_nul = has_nul or any("\x00" in str(key) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest, has_nul
