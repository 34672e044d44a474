"""The Lambda handler: POST /process-task on the Function URL or a direct invoke start
one worker, which claims a batch and works it in order; the scheduled tick dispatches:
one query tells it what is claimable, then it starts more workers (asynchronous
invocations of this function, up to MAX_CONCURRENCY) and works one batch itself."""

import base64
import binascii
import json
import logging
import os
from contextlib import AbstractContextManager
from http import HTTPStatus
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import LambdaFunctionUrlResolver, Response
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from handler.credentials import conninfo_provider
from handler.models import ScheduledTick, WorkRequest, describe_errors
from queue_core import (
    ConnectionHolder,
    DatabaseUnavailable,
    Outcome,
    Settings,
    Worker,
    WorkReport,
)
from queue_core.db import retrying
from queue_core.dispatch import DispatchPlan, plan_dispatch
from queue_core.errors import InvalidInput
from queue_core.validation import parse_json, whole_number

DEFAULT_MAX_BODY_BYTES = 16 * 1024


def _max_body_bytes() -> int:
    raw = os.environ.get("MAX_REQUEST_BYTES", "").strip()
    value = whole_number(raw)
    if value is not None and value >= 1:
        return value
    if raw:
        # Read at import: a bad value must not stop the function from loading at all.
        logging.getLogger(__name__).warning(
            "MAX_REQUEST_BYTES must be a whole number of at least 1; using %s",
            DEFAULT_MAX_BODY_BYTES,
        )
    return DEFAULT_MAX_BODY_BYTES


MAX_BODY_BYTES = _max_body_bytes()

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "task-queue"))
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "TaskQueue"))
tracer = Tracer()
url_app = LambdaFunctionUrlResolver()

# Queue logs (claims, completions, releases) and the credentials log come out through
# the Powertools formatter.
copy_config_to_registered_loggers(
    source_logger=logger, include={"queue_core", "handler"}
)

# Kept across warm invocations; the connection inside is replaced when it breaks.
_settings: Settings | None = None
_connections: ConnectionHolder | None = None


def _state() -> tuple[Settings, ConnectionHolder]:
    global _settings, _connections
    if _connections is None or _settings is None:
        _settings = Settings.from_env(require_database_url=False)
        _connections = ConnectionHolder.for_settings(
            _settings,
            application_name="task-queue-worker",
            conninfo=conninfo_provider(os.environ),
        )
    return _settings, _connections


def _worker() -> Worker:
    settings, connections = _state()
    return Worker(connections, settings, step_span=_trace_step)


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
            tick = parse(event=event, model=ScheduledTick)
        except ValidationError as error:
            return _rejected(error, entry="schedule")
        logger.set_correlation_id(tick.id)
        return _dispatch(context)

    if not isinstance(event, dict):
        return _refusal([{"field": "event", "rule": "must be a JSON object"}], "invoke")
    try:
        request = parse(event=event, model=WorkRequest)
    except ValidationError as error:
        return _rejected(error, entry="invoke")
    return _work(request, context, entry="invoke")


@url_app.post("/process-task")
def process_task() -> Response:
    body = url_app.current_event.body or ""
    if len(body) > MAX_BODY_BYTES * 4 // 3 + 4:
        return _body_too_large()
    try:
        raw = _raw_body(body, url_app.current_event.is_base64_encoded)
    except ValueError as error:
        return _http_error(400, [{"field": "body", "rule": str(error)}])
    if len(raw) > MAX_BODY_BYTES:
        return _body_too_large()
    try:
        document = parse_json(raw, "body") if raw.strip() else {}
    except InvalidInput as error:
        return _http_error(400, [{"field": error.field, "rule": error.rule}])
    if not isinstance(document, dict):
        problem = {"field": "body", "rule": "must be a JSON object"}
        return _http_error(400, [problem])

    try:
        request = parse(event=document, model=WorkRequest)
    except ValidationError as error:
        return _http_error(400, describe_errors(error))
    return Response(
        200, "application/json", _work(request, url_app.lambda_context, "http")
    )


@url_app.route(
    "/process-task",
    method=["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT"],
)
def process_task_wrong_method() -> Response:
    method = url_app.current_event.request_context.http.method
    problem = {"field": "method", "rule": f"must be POST, got {method}"}
    return _http_error(405, [problem], headers={"Allow": "POST"})


@url_app.not_found
def unknown_path(_error: Exception) -> Response:
    path = url_app.current_event.path
    if path == "/process-task":  # a method no route names
        return process_task_wrong_method()
    return _http_error(
        404, [{"field": "path", "rule": f"must be /process-task, got {path}"}]
    )


@url_app.exception_handler(DatabaseUnavailable)
def database_unavailable(error: DatabaseUnavailable) -> Response:
    logger.warning("database unavailable", extra={"action": "db_unavailable"})
    return _http_error(
        503, [{"field": "database", "rule": "is unreachable, retry later"}]
    )


def _dispatch(context: LambdaContext) -> dict[str, Any]:
    """The scheduled tick. Idle, it costs this one query and nothing else."""
    settings, connections = _state()
    with tracer.provider.in_subsegment("## plan_dispatch"):
        plan = retrying(
            lambda: plan_dispatch(
                connections.get(), settings.lease_seconds, settings.max_concurrency
            ),
            on_retry=lambda _error: connections.discard_if_broken(),
        )
    _record_queue_gauges(plan)
    started = _start_others(plan, settings, context)
    logger.info(
        "tick dispatched",
        extra={"action": "dispatch", **plan.as_dict(), "started": started},
    )

    if plan.work_here:
        response = _work(WorkRequest(), context, entry="schedule")
    else:
        logger.append_keys(worker_id=context.aws_request_id, entry="schedule")
        idle = WorkReport(context.aws_request_id)
        _record_metrics(idle)
        response = idle.as_dict()
    return {**response, "dispatch": {**plan.as_dict(), "started": started}}


def _start_others(
    plan: DispatchPlan, settings: Settings, context: LambdaContext
) -> int:
    if plan.start_others == 0:
        return 0
    # Imported here: boto3 is loaded only by a tick that fans out.
    from handler.kick import start_workers

    payload: dict[str, Any] = {}
    if settings.worker_max_batches > 1:
        payload["maxBatches"] = settings.worker_max_batches
    started = start_workers(context.function_name, [payload] * plan.start_others)
    metrics.add_metric("WorkersStarted", MetricUnit.Count, started)
    return started


def _work(request: WorkRequest, context: LambdaContext, entry: str) -> dict[str, Any]:
    worker_id = request.worker_id or context.aws_request_id
    logger.append_keys(worker_id=worker_id, entry=entry)
    settings, _ = _state()
    reports = _worker().run_batches(
        worker_id,
        preferred_batch_id=request.batch_id,
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
        max_batches=request.max_batches or settings.worker_max_batches,
    )
    for report in reports:
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
    response = reports[0].as_dict()
    if len(reports) > 1:
        response["more"] = [report.as_dict() for report in reports[1:]]
    return response


def _record_queue_gauges(plan: DispatchPlan) -> None:
    """Queue depth and the age of the oldest pending task, once per scheduled tick.

    No dimension but the service: one series per deployment, whatever the batches.
    """
    metrics.add_metric("QueueDepth", MetricUnit.Count, plan.pending)
    metrics.add_metric(
        "OldestPendingAge", MetricUnit.Seconds, plan.oldest_pending_seconds
    )


def _record_metrics(report: WorkReport) -> None:
    metrics.add_metric("TasksCompleted", MetricUnit.Count, len(report.completed))
    for task in report.completed:
        metrics.add_metric("TaskDuration", MetricUnit.Milliseconds, task.duration_ms)
    # A task completed on its second start or later: a retry that did its job (a
    # failed start is counted in TasksFailed).
    retried = sum(1 for task in report.completed if task.attempt > 1)
    metrics.add_metric("TaskRetries", MetricUnit.Count, retried)
    failed = (Outcome.TASK_FAILED, Outcome.DEAD_LETTERED, Outcome.BATCH_HALTED)
    metrics.add_metric(
        "TasksFailed", MetricUnit.Count, 1 if report.outcome in failed else 0
    )
    metrics.add_metric("TasksDeadLettered", MetricUnit.Count, len(report.dead_lettered))
    metrics.add_metric("BatchesHalted", MetricUnit.Count, len(report.halted_batch_ids))
    counted = {
        Outcome.NO_WORK: "NoWorkInvocations",
        Outcome.BATCH_BUSY: "BatchBusyInvocations",
        Outcome.LEASE_LOST: "LeasesLost",
        Outcome.DATABASE_ERROR: "DatabaseErrors",
    }
    if report.outcome in counted:
        metrics.add_metric(counted[report.outcome], MetricUnit.Count, 1)
    if report.taken_over_from:
        metrics.add_metric("LeaseTakeovers", MetricUnit.Count, 1)


def _is_function_url_event(event: Any) -> bool:
    """A Function URL request: anything less is refused as a direct invoke."""
    context = event.get("requestContext") if isinstance(event, dict) else None
    http = context.get("http") if isinstance(context, dict) else None
    return isinstance(http, dict) and isinstance(http.get("method"), str)


def _raw_body(body: str, is_base64: bool) -> bytes:
    """The request body as bytes of UTF-8 text; ValueError says what is wrong."""
    if is_base64:
        try:
            raw = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise ValueError("must be valid base64 (isBase64Encoded is true)") from None
    else:
        raw = body.encode("utf-8", "surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("must be UTF-8 text") from None
    return raw


def _body_too_large() -> Response:
    rule = f"must be at most {MAX_BODY_BYTES} bytes"
    return _http_error(413, [{"field": "body", "rule": rule}])


def _is_scheduled_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and "detail-type" in event
        and event.get("source") in ("aws.events", "aws.scheduler")
    )


def _rejected(error: ValidationError, entry: str) -> dict[str, Any]:
    return _refusal(describe_errors(error), entry)


def _refusal(problems: list[dict[str, str]], entry: str) -> dict[str, Any]:
    """The answer to bad input, counted and logged; nothing was written."""
    metrics.add_metric("InvalidRequests", MetricUnit.Count, 1)
    logger.info(
        "request rejected",
        extra={"action": "request_rejected", "entry": entry, "problems": problems},
    )
    return {
        "error": "invalid_request",
        "message": _message(problems),
        "problems": problems,
    }


def _http_error(
    status: int, problems: list[dict[str, str]], headers: dict[str, str] | None = None
) -> Response:
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        body = {
            "error": "unavailable",
            "message": _message(problems),
            "problems": problems,
        }
    else:
        body = _refusal(problems, "http")
    return Response(status, "application/json", json.dumps(body), headers=headers)


def _message(problems: list[dict[str, str]]) -> str:
    return "; ".join(f"{problem['field']}: {problem['rule']}" for problem in problems)
