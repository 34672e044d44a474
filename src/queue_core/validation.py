"""The rules every door of the queue applies to batch names and payloads."""

import json
import re
from typing import Any

from queue_core.errors import InvalidInput

BATCH_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
BATCH_ID_RULE = "must be 1-64 characters of letters, digits and - _ . :"
_BATCH_ID = re.compile(BATCH_ID_PATTERN)

MAX_PAYLOAD_DEPTH = 32

_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")
MAX_BIGINT = 2**63 - 1


def whole_number(raw: str) -> int | None:
    """The value of ASCII digits up to PostgreSQL's bigint (a task id), else None.

    str.isdigit() would also take "²" or Arabic-Indic digits, which int() refuses or
    reads differently.
    """
    if not _WHOLE_NUMBER.fullmatch(raw):
        return None
    value = int(raw)
    return value if value <= MAX_BIGINT else None


def parse_json(text: str | bytes, field: str) -> Any:
    """The value of a JSON text; InvalidInput names the field and what is wrong."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput(
            field, f"must be valid JSON ({error.msg} at {error.pos})"
        ) from None
    except RecursionError:
        raise InvalidInput(
            field, f"must nest at most {MAX_PAYLOAD_DEPTH} levels"
        ) from None
    except ValueError:  # Python reads integers of up to 4,300 digits
        raise InvalidInput(
            field, "must not hold a number of over 4,300 digits"
        ) from None


def check_batch_id(batch_id: object, field: str = "batchId") -> str:
    """Return the batch id if it is a valid name, else raise InvalidInput."""
    if not isinstance(batch_id, str):
        raise InvalidInput(field, f"must be a string, got {type(batch_id).__name__}")
    if not _BATCH_ID.fullmatch(batch_id):
        raise InvalidInput(field, BATCH_ID_RULE)
    return batch_id


def encode_payload(payload: Any, max_bytes: int, field: str = "payload") -> str:
    """The JSON text stored in "Payload", after checking the payload's limits."""
    _check_structure(payload, field)
    try:
        text = json.dumps(
            payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as error:
        raise InvalidInput(field, f"must be JSON-serializable ({error})") from None

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
    return text


def _check_structure(payload: Any, field: str) -> None:
    """Depth and NUL characters, checked without recursion (so any depth is safe)."""
    stack = [(payload, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, field)
        elif isinstance(item, dict | list | tuple):
            if depth > MAX_PAYLOAD_DEPTH:
                raise InvalidInput(
                    field, f"must nest at most {MAX_PAYLOAD_DEPTH} levels"
                )
            if isinstance(item, dict):
                for key in item:
                    if isinstance(key, str):
                        _check_text(key, field)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str, field: str) -> None:
    if "\x00" in text:
        raise InvalidInput(
            field, "must not contain NUL characters (PostgreSQL rejects them)"
        )
