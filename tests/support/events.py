"""The real-format Lambda events shared beside the repository, loaded by name."""

import copy
import json
import uuid
from functools import cache
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_EVENTS = REPO_ROOT / ".." / "shared" / "events"
REPO_EVENTS = REPO_ROOT / "events"


def events_dir() -> Path:
    """The shared folder when it exists, else the repository's own copies."""
    if SHARED_EVENTS.is_dir() and any(SHARED_EVENTS.glob("*.json")):
        return SHARED_EVENTS.resolve()
    return REPO_EVENTS


@cache
def _load(name: str) -> dict[str, Any]:
    return json.loads((events_dir() / f"{name}.json").read_text())


def load_event(name: str) -> Any:
    """A fresh copy of events/<name>.json, safe to change."""
    return copy.deepcopy(_load(name))


def with_unique_ids(event: Any) -> Any:
    """The same event with the ids a real delivery makes unique for each call."""
    if isinstance(event, dict) and isinstance(event.get("requestContext"), dict):
        event["requestContext"]["requestId"] = str(uuid.uuid4())
    elif isinstance(event, dict) and "detail-type" in event:
        event["id"] = str(uuid.uuid4())
    return event


def function_url_event(
    body: str | None,
    *,
    method: str = "POST",
    path: str = "/process-task",
    base64_encoded: bool = False,
) -> dict[str, Any]:
    """The Function URL event of the shared files with another body, method or path."""
    event = load_event("function-url-process-task")
    event["body"] = body
    event["isBase64Encoded"] = base64_encoded
    event["rawPath"] = path
    event["requestContext"]["http"]["method"] = method
    event["requestContext"]["http"]["path"] = path
    return with_unique_ids(event)


def report_of(response: dict[str, Any]) -> dict[str, Any]:
    """The worker's report, from a direct answer or from a Function URL response."""
    if "statusCode" in response:
        assert response["statusCode"] == 200, response
        return json.loads(response["body"])
    return response
