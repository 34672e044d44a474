"""The Lambda handler: a scheduled tick, POST /process-task on the Function URL, or a
direct invoke each start one worker, which claims a batch and works it in order."""

import base64
import binascii
import json
import os
from contextlib import AbstractContextManager
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import LambdaFunctionUrlResolver, Response
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from handler.models import WorkRequest, describe_errors
from queue_core import (
    ConnectionHolder,
    DatabaseUnavailable,
    Outcome,
    Settings,
    Worker,
    WorkReport,
)

MAX_BODY_BYTES = int(os.environ.get("MAX_REQUEST_BYTES", 16 * 1024))

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "task-queue"))
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "TaskQueue"))
tracer = Tracer()
url_app = LambdaFunctionUrlResolver()

# Queue logs (claims, completions, releases) come out through the Powertools formatter.
copy_config_to_registered_loggers(source_logger=logger, include={"queue_core"})

# Kept across warm invocations; the connection inside is replaced when it breaks.
_settings: Settings | None = None
_connections: ConnectionHolder | None = None


def _worker() -> Worker:
    global _settings, _connections
    if _connections is None:
        _settings = Settings.from_env()
        _connections = ConnectionHolder.for_settings(
            _settings, application_name="task-queue-worker"
        )
    return Worker(_connections, _settings, step_span=_trace_step)


def _trace_step(name: str) -> AbstractContextManager:
    return tracer.provider.in_subsegment(f"## {name}")


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    if _is_function_url_event(event):
        logger.set_correlation_id(event["requestContext"].get("requestId"))
        return url_app.resolve(event, context)

    if _is_scheduled_event(event):
        try:
            tick = parse(event=event, model=EventBridgeModel)
        except ValidationError as error:
            return _rejected(error, entry="schedule")
        logger.set_correlation_id(tick.id)
        return _work(WorkRequest(), context, entry="schedule")

    if not isinstance(event, dict):
        problems = [{"field": "event", "rule": "must be a JSON object"}]
        return {
            "error": "invalid_request",
            "message": _message(problems),
            "problems": problems,
        }
    try:
        request = parse(event=event, model=WorkRequest)
    except ValidationError as error:
        return _rejected(error, entry="invoke")
    return _work(request, context, entry="invoke")


@url_app.post("/process-task")
def process_task() -> Response:
    event = url_app.current_event
    raw = _body_bytes(event.body, event.is_base64_encoded)
    if raw is None:
        return _http_error(400, [{"field": "body", "rule": "must be valid base64"}])
    if len(raw) > MAX_BODY_BYTES:
        return _http_error(
            413, [{"field": "body", "rule": f"must be at most {MAX_BODY_BYTES} bytes"}]
        )
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _http_error(400, [{"field": "body", "rule": "must be UTF-8 text"}])
    try:
        document = json.loads(body) if body.strip() else {}
    except json.JSONDecodeError as error:
        return _http_error(
            400, [{"field": "body", "rule": f"must be valid JSON ({error.msg})"}]
        )
    except RecursionError:
        return _http_error(
            400, [{"field": "body", "rule": "must not nest JSON this deeply"}]
        )

    try:
        request = parse(event=document, model=WorkRequest)
    except ValidationError as error:
        logger.info(
            "request rejected", extra={"action": "request_rejected", "entry": "http"}
        )
        return _http_error(400, describe_errors(error))
    return Response(
        200, "application/json", _work(request, url_app.lambda_context, "http")
    )


@url_app.route(
    "/process-task", method=["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
)
def process_task_wrong_method() -> Response:
    method = url_app.current_event.request_context.http.method
    problem = {"field": "method", "rule": f"must be POST, got {method}"}
    return _http_error(405, [problem], headers={"Allow": "POST"})


@url_app.not_found
def unknown_path(_error: Exception) -> Response:
    path = url_app.current_event.path
    return _http_error(
        404, [{"field": "path", "rule": f"must be /process-task, got {path}"}]
    )


@url_app.exception_handler(DatabaseUnavailable)
def database_unavailable(error: DatabaseUnavailable) -> Response:
    logger.warning("database unavailable", extra={"action": "db_unavailable"})
    return _http_error(
        503, [{"field": "database", "rule": "is unreachable, retry later"}]
    )


def _work(request: WorkRequest, context: LambdaContext, entry: str) -> dict[str, Any]:
    worker_id = request.worker_id or context.aws_request_id
    logger.append_keys(worker_id=worker_id, entry=entry)
    report = _worker().run(
        worker_id,
        preferred_batch_id=request.batch_id,
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
    )
    _record_metrics(report)
    logger.info(
        "worker finished",
        extra={
            "action": "worker_finished",
            "outcome": report.outcome.value,
            "batch_id": report.batch_id,
            "completed": len(report.completed),
        },
    )
    return report.as_dict()


def _record_metrics(report: WorkReport) -> None:
    metrics.add_metric("TasksCompleted", MetricUnit.Count, len(report.completed))
    for task in report.completed:
        metrics.add_metric("TaskDuration", MetricUnit.Milliseconds, task.duration_ms)
    counted = {
        Outcome.TASK_FAILED: "TasksFailed",
        Outcome.DEAD_LETTERED: "TasksFailed",
        Outcome.BATCH_HALTED: "TasksFailed",
        Outcome.NO_WORK: "NoWorkInvocations",
        Outcome.BATCH_BUSY: "BatchBusyInvocations",
        Outcome.LEASE_LOST: "LeasesLost",
    }
    if report.outcome in counted:
        metrics.add_metric(counted[report.outcome], MetricUnit.Count, 1)
    if report.taken_over_from:
        metrics.add_metric("LeaseTakeovers", MetricUnit.Count, 1)
    if report.dead_lettered:
        metrics.add_metric(
            "TasksDeadLettered", MetricUnit.Count, len(report.dead_lettered)
        )
    if report.halted_batch_ids:
        metrics.add_metric(
            "BatchesHalted", MetricUnit.Count, len(report.halted_batch_ids)
        )


def _body_bytes(body: str | None, base64_encoded: bool) -> bytes | None:
    """The request body as sent; None when it claims base64 and is not."""
    if not body:
        return b""
    if not base64_encoded:
        return body.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_function_url_event(event: Any) -> bool:
    context = event.get("requestContext") if isinstance(event, dict) else None
    return isinstance(context, dict) and isinstance(context.get("http"), dict)


def _is_scheduled_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and "detail-type" in event
        and event.get("source") in ("aws.events", "aws.scheduler")
    )


def _rejected(error: ValidationError, entry: str) -> dict[str, Any]:
    problems = describe_errors(error)
    logger.info(
        "request rejected", extra={"action": "request_rejected", "entry": entry}
    )
    return {
        "error": "invalid_request",
        "message": _message(problems),
        "problems": problems,
    }


def _http_error(
    status: int, problems: list[dict[str, str]], headers: dict[str, str] | None = None
) -> Response:
    body = {
        "error": "invalid_request",
        "message": _message(problems),
        "problems": problems,
    }
    return Response(status, "application/json", json.dumps(body), headers=headers)


def _message(problems: list[dict[str, str]]) -> str:
    return "; ".join(f"{problem['field']}: {problem['rule']}" for problem in problems)
