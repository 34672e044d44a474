"""Every entry point of the Lambda handler, with the real-format shared events."""

import base64
import json
import os

import pytest

from queue_core import enqueue_many
from tests.support import db
from tests.support.events import function_url_event, load_event, with_unique_ids
from tests.support.lambda_context import LambdaContext
from tests.support.processors import read_records


@pytest.fixture
def queue(conn):
    """Batches A, B and C with two tasks each; their ids by batch."""
    ids = enqueue_many(conn, [(b, {"n": n}) for b in "ABC" for n in range(2)])
    return {"A": ids[0:2], "B": ids[2:4], "C": ids[4:6]}


def invoke(app, event, remaining_seconds: float = 60):
    context = LambdaContext(remaining_seconds)
    return app.lambda_handler(event, context), context


def http_body(response) -> dict:
    assert response["headers"]["Content-Type"] == "application/json"
    return json.loads(response["body"])


# ------------------------------------------------------------------ the good events


def test_scheduled_tick_works_the_batch_worked_least_recently(
    handler_app, conn, queue, records_file
):
    # GIVEN A and C were worked a moment ago and B never was
    conn.execute(
        """UPDATE "BatchLocks" SET "LockedAt" = statement_timestamp()
           WHERE "BatchId" IN ('A', 'C')"""
    )

    # WHEN the default schedule ticks
    report, context = invoke(
        handler_app, with_unique_ids(load_event("schedule-default"))
    )

    # THEN a worker named after the request drained B, in order, and gave its lease back
    assert report["workerId"] == context.aws_request_id
    assert report["outcome"] == "drained"
    assert (report["batchId"], report["completed"]) == ("B", queue["B"])
    assert db.lease(conn, "B")["LockedBy"] is None
    assert db.pending_ids(conn) == queue["A"] + queue["C"]
    assert [r["task_id"] for r in read_records(records_file)][::2] == queue["B"]


def test_schedule_with_input_works_batch_b_first(handler_app, conn, queue):
    # GIVEN A, B and C all waiting, A never worked as much as B
    # WHEN the schedule whose Input names batch B ticks
    report, context = invoke(handler_app, load_event("schedule-input-batch-b"))

    # THEN B is worked, by a worker named after the request
    assert (report["batchId"], report["completed"]) == ("B", queue["B"])
    assert report["workerId"] == context.aws_request_id
    assert db.pending_ids(conn) == queue["A"] + queue["C"]


def test_direct_invoke_works_its_batch_under_its_worker_id(handler_app, conn, queue):
    # WHEN the function is invoked directly with {"batchId": "C", "workerId": ...}
    report, _ = invoke(handler_app, load_event("direct-invoke"))

    # THEN C is worked by "manual-run-1"
    assert report["workerId"] == "manual-run-1"
    assert (report["outcome"], report["batchId"]) == ("drained", "C")
    assert report["completed"] == queue["C"]
    assert db.pending_ids(conn) == queue["A"] + queue["B"]


def test_function_url_post_works_the_batch_of_its_body(handler_app, conn, queue):
    # WHEN POST /process-task arrives with {"batchId": "A", "workerId": "worker-1"}
    response, _ = invoke(handler_app, load_event("function-url-process-task"))

    # THEN it answers 200 with the report of worker-1 on A
    assert response["statusCode"] == 200
    report = http_body(response)
    assert (report["workerId"], report["batchId"]) == ("worker-1", "A")
    assert report["completed"] == queue["A"]
    assert db.pending_ids(conn) == queue["B"] + queue["C"]


def test_function_url_base64_body_is_decoded(handler_app, conn, queue):
    # WHEN the body arrives base64-encoded: {"batchId": "C", "workerId": "worker-7"}
    response, _ = invoke(handler_app, load_event("function-url-base64-body"))

    # THEN it is read like any other
    assert response["statusCode"] == 200
    report = http_body(response)
    assert (report["workerId"], report["batchId"]) == ("worker-7", "C")
    assert report["completed"] == queue["C"]


def test_function_url_body_of_exactly_the_size_limit_is_accepted(
    handler_app, conn, queue
):
    # GIVEN a valid body padded with JSON whitespace to exactly the limit
    document = '{"batchId": "B"}'
    body = document + " " * (handler_app.MAX_BODY_BYTES - len(document))

    # WHEN it is posted
    response, _ = invoke(handler_app, function_url_event(body))

    # THEN it is worked
    assert response["statusCode"] == 200
    assert http_body(response)["completed"] == queue["B"]


def test_http_response_carries_no_work_when_the_queue_is_empty(handler_app, conn):
    # GIVEN an empty queue
    # WHEN POST /process-task arrives
    response, _ = invoke(handler_app, load_event("function-url-process-task"))

    # THEN the answer is 200 and says there was no work
    assert response["statusCode"] == 200
    assert http_body(response)["outcome"] == "no_work"


def test_invocation_without_time_for_a_task_claims_nothing(handler_app, conn, queue):
    # GIVEN an invocation with less time left than one task's budget and the margin
    before = db.table_state(conn)

    # WHEN it is invoked
    report, _ = invoke(handler_app, load_event("direct-invoke"), remaining_seconds=1.5)

    # THEN it stops at once, without claiming or starting anything
    assert report["outcome"] == "time_up"
    assert db.table_state(conn) == before


def test_worker_gives_the_batch_back_when_time_runs_short(
    handler_app, conn, queue, monkeypatch
):
    # GIVEN tasks of 0.6 s, and an invocation with 0.5 s more than one task's budget
    # and margin (2 s in all): time to start one task, not two
    monkeypatch.setenv("RECORD_SLEEP_SECONDS", "0.6")

    # WHEN it is invoked
    report, _ = invoke(handler_app, load_event("direct-invoke"), remaining_seconds=2.5)

    # THEN it completes the head of C, then stops and releases C for the next worker
    assert report["outcome"] == "time_up"
    assert report["completed"] == queue["C"][:1]
    assert db.pending_ids(conn, "C") == queue["C"][1:]
    assert db.lease(conn, "C")["LockedBy"] is None
    # AND the next task was not started
    assert db.task(conn, queue["C"][1])["Attempts"] == 0


# ------------------------------------------------------------------ refused requests


def test_function_url_bad_batch_is_refused_naming_batch_id(
    handler_app, conn, queue, records_file
):
    before = db.table_state(conn)

    # WHEN POST /process-task names a batch that breaks the naming rule
    response, _ = invoke(handler_app, load_event("function-url-bad-batch"))

    # THEN 400 names batchId and its rule, and nothing was claimed or changed
    assert response["statusCode"] == 400
    body = http_body(response)
    assert body["error"] == "invalid_request"
    assert [p["field"] for p in body["problems"]] == ["batchId"]
    assert "batchId" in body["message"]
    assert db.table_state(conn) == before
    assert read_records(records_file) == []


def test_function_url_wrong_method_is_refused_with_allow_post(
    handler_app, conn, queue, records_file
):
    before = db.table_state(conn)

    # WHEN GET /process-task arrives
    response, _ = invoke(handler_app, load_event("function-url-wrong-method"))

    # THEN 405 says only POST is allowed, and nothing changed
    assert response["statusCode"] == 405
    assert response["headers"]["Allow"] == "POST"
    assert http_body(response)["problems"][0]["field"] == "method"
    assert db.table_state(conn) == before
    assert read_records(records_file) == []


def _oversized_body() -> str:
    import handler.app

    document = '{"batchId": "B"}'
    return document + " " * (handler.app.MAX_BODY_BYTES - len(document) + 1)


BAD_HTTP_REQUESTS = {
    "unknown path": (lambda: function_url_event("{}", path="/tasks"), 404, "path"),
    "trailing slash": (
        lambda: function_url_event("{}", path="/process-task/"),
        404,
        "path",
    ),
    "PUT": (lambda: function_url_event("{}", method="PUT"), 405, "method"),
    "DELETE": (lambda: function_url_event(None, method="DELETE"), 405, "method"),
    "malformed JSON": (lambda: function_url_event('{"batchId": "B"'), 400, "body"),
    "JSON array": (lambda: function_url_event('["B"]'), 400, "body"),
    "JSON null": (lambda: function_url_event("null"), 400, "body"),
    "batchId a number": (lambda: function_url_event('{"batchId": 5}'), 400, "batchId"),
    "batchId a list": (
        lambda: function_url_event('{"batchId": ["B"]}'),
        400,
        "batchId",
    ),
    "batchId empty": (lambda: function_url_event('{"batchId": ""}'), 400, "batchId"),
    "batchId of 65 characters": (
        lambda: function_url_event(json.dumps({"batchId": "b" * 65})),
        400,
        "batchId",
    ),
    "batchId with a space": (
        lambda: function_url_event('{"batchId": "B C"}'),
        400,
        "batchId",
    ),
    "extra field": (
        lambda: function_url_event('{"batchId": "B", "priority": 1}'),
        400,
        "priority",
    ),
    "workerId with a space": (
        lambda: function_url_event('{"workerId": "worker 1"}'),
        400,
        "workerId",
    ),
    "workerId of 129 characters": (
        lambda: function_url_event(json.dumps({"workerId": "w" * 129})),
        400,
        "workerId",
    ),
    "body marked base64 that is not": (
        lambda: function_url_event("not base64!", base64_encoded=True),
        400,
        "body",
    ),
    "base64 body that is not UTF-8": (
        lambda: function_url_event(
            base64.b64encode(b'{"batchId": "\xff"}').decode(), base64_encoded=True
        ),
        400,
        "body",
    ),
    "body over the size limit": (
        lambda: function_url_event(_oversized_body()),
        413,
        "body",
    ),
    "JSON nested too deep to parse": (
        lambda: function_url_event("[" * 6000 + "]" * 6000),
        400,
        "body",
    ),
    "a JSON number": (lambda: function_url_event("5"), 400, "body"),
    "a JSON string": (lambda: function_url_event('"B"'), 400, "body"),
    "batchId true": (lambda: function_url_event('{"batchId": true}'), 400, "batchId"),
    "batchId an object": (
        lambda: function_url_event('{"batchId": {"$ne": ""}}'),
        400,
        "batchId",
    ),
    "batchId nested lists": (
        lambda: function_url_event('{"batchId": ' + "[" * 50 + "]" * 50 + "}"),
        400,
        "batchId",
    ),
    "batchId with a NUL": (
        lambda: function_url_event('{"batchId": "A\\u0000"}'),
        400,
        "batchId",
    ),
    "batchId with a lone surrogate": (
        lambda: function_url_event('{"batchId": "A\\ud800"}'),
        400,
        "batchId",
    ),
    "batchId with SQL": (
        lambda: function_url_event(json.dumps({"batchId": "A' OR '1'='1"})),
        400,
        "batchId",
    ),
    "workerId a number": (
        lambda: function_url_event('{"workerId": 7}'),
        400,
        "workerId",
    ),
    "workerId with a NUL": (
        lambda: function_url_event('{"workerId": "w\\u0000"}'),
        400,
        "workerId",
    ),
    "TRACE": (lambda: function_url_event(None, method="TRACE"), 405, "method"),
    "CONNECT": (lambda: function_url_event(None, method="CONNECT"), 405, "method"),
    "a method HTTP does not have": (
        lambda: function_url_event(None, method="FOO"),
        405,
        "method",
    ),
    "an integer of 5000 digits": (
        lambda: function_url_event('{"batchId": ' + "9" * 5000 + "}"),
        400,
        "body",
    ),
    "JSON nested 8000 deep": (
        lambda: function_url_event("[" * 8000 + "]" * 8000),
        400,
        "body",
    ),
    "base64 body over the size limit": (
        lambda: function_url_event(
            base64.b64encode(_oversized_body().encode()).decode(), base64_encoded=True
        ),
        413,
        "body",
    ),
}


@pytest.mark.parametrize(
    ("make_event", "status", "field"),
    BAD_HTTP_REQUESTS.values(),
    ids=BAD_HTTP_REQUESTS.keys(),
)
def test_bad_http_request_is_refused_and_changes_nothing(
    handler_app, conn, queue, records_file, make_event, status, field
):
    before = db.table_state(conn)

    # WHEN the bad request arrives at the Function URL
    response, _ = invoke(handler_app, make_event())

    # THEN it is refused with the right status, naming the field at fault
    assert response["statusCode"] == status
    body = http_body(response)
    assert body["error"] == "invalid_request"
    assert field in [problem["field"] for problem in body["problems"]]
    assert body["message"]

    # AND nothing was claimed, started or changed
    assert db.table_state(conn) == before
    assert read_records(records_file) == []


def test_default_request_size_limit_is_16_kib(handler_app):
    # GIVEN MAX_REQUEST_BYTES is not set
    if os.environ.get("MAX_REQUEST_BYTES"):
        pytest.skip("MAX_REQUEST_BYTES is set in this environment")

    # THEN Function URL bodies are limited to 16 KiB
    assert handler_app.MAX_BODY_BYTES == 16 * 1024


@pytest.mark.parametrize("value", ["\u00b2", "12kb", "0", "-5"])
def test_a_bad_request_size_limit_falls_back_to_the_default(
    handler_app, monkeypatch, value
):
    # GIVEN a MAX_REQUEST_BYTES that is not a whole number of at least 1
    monkeypatch.setenv("MAX_REQUEST_BYTES", value)

    # THEN the function still loads, with the 16 KiB default
    assert handler_app._max_body_bytes() == 16 * 1024


BAD_DIRECT_INVOKES = {
    "a list": ([{"batchId": "B"}], "event"),
    "a string": ('{"batchId": "B"}', "event"),
    "null": (None, "event"),
    "a number": (5, "event"),
    "batchId a number": ({"batchId": 5}, "batchId"),
    "batchId of 65 characters": ({"batchId": "b" * 65}, "batchId"),
    "batchId with SQL": ({"batchId": 'A\'; DROP TABLE "Tasks"; --'}, "batchId"),
    "extra field": ({"batchId": "B", "priority": 1}, "priority"),
    "workerId empty": ({"workerId": ""}, "workerId"),
    "requestContext a number": ({"requestContext": 5}, "requestContext"),
    "requestContext a string": ({"requestContext": "http"}, "requestContext"),
    "requestContext a list": ({"requestContext": ["http"]}, "requestContext"),
    "requestContext without http": ({"requestContext": {}}, "requestContext"),
    "requestContext.http without a method": (
        {"requestContext": {"http": {"path": "/process-task"}}},
        "requestContext",
    ),
    "true": (True, "event"),
    "batchId empty": ({"batchId": ""}, "batchId"),
    "batchId true": ({"batchId": True}, "batchId"),
    "batchId an object": ({"batchId": {"$ne": ""}}, "batchId"),
    "batchId with a NUL": ({"batchId": "A\x00"}, "batchId"),
    "batchId with a newline": ({"batchId": "A\n"}, "batchId"),
    "batchId deeply nested": ({"batchId": [[[[[["A"]]]]]]}, "batchId"),
    "workerId with a NUL": ({"workerId": "w\x00"}, "workerId"),
    "workerId of 129 characters": ({"workerId": "w" * 129}, "workerId"),
    "schedule Input with a bad batch": ({"batchId": "no spaces"}, "batchId"),
}


@pytest.mark.parametrize(
    ("event", "field"), BAD_DIRECT_INVOKES.values(), ids=BAD_DIRECT_INVOKES.keys()
)
def test_bad_direct_invoke_is_refused_and_changes_nothing(
    handler_app, conn, queue, records_file, event, field
):
    before = db.table_state(conn)

    # WHEN the function is invoked directly with a bad event
    answer, _ = invoke(handler_app, event)

    # THEN the answer is an invalid_request naming the field at fault
    assert answer["error"] == "invalid_request"
    assert field in [problem["field"] for problem in answer["problems"]]

    # AND nothing was claimed, started or changed
    assert db.table_state(conn) == before
    assert read_records(records_file) == []


# ------------------------------------------------- bodies and events of odd shapes


def test_incomplete_scheduled_event_is_refused(handler_app, conn, queue):
    before = db.table_state(conn)

    # WHEN a direct invoke looks like a scheduled event but lacks its fields
    answer, _ = invoke(
        handler_app, {"detail-type": "Scheduled Event", "source": "aws.events"}
    )

    # THEN it is refused like any other bad event, and nothing changes
    assert answer["error"] == "invalid_request"
    assert db.table_state(conn) == before


def test_body_that_is_a_json_string_is_refused(handler_app, conn, queue, records_file):
    before = db.table_state(conn)

    # WHEN the body is a JSON string (which happens to hold a JSON object)
    response, _ = invoke(
        handler_app, function_url_event(json.dumps('{"batchId": "B"}'))
    )

    # THEN it is refused as not an object, and nothing is worked
    assert response["statusCode"] == 400
    assert db.table_state(conn) == before
    assert read_records(records_file) == []


def test_base64_body_that_is_not_utf8_is_refused(handler_app, conn, queue):
    before = db.table_state(conn)
    body = base64.b64encode(b'{"batchId": "\xff"}').decode()

    response, _ = invoke(handler_app, function_url_event(body, base64_encoded=True))

    assert response["statusCode"] == 400
    assert db.table_state(conn) == before


@pytest.mark.parametrize("request_context", [5, "http", ["http"]])
def test_direct_invoke_with_odd_request_context_is_refused(
    handler_app, conn, queue, request_context
):
    before = db.table_state(conn)

    answer, _ = invoke(handler_app, {"requestContext": request_context})

    assert answer["error"] == "invalid_request"
    assert db.table_state(conn) == before


@pytest.mark.parametrize(
    "event",
    [
        {"source": "aws.events", "detail-type": "Scheduled Event"},
        {**load_event("schedule-default"), "time": "not a time"},
        {**load_event("schedule-default"), "detail": "not an object"},
        {**load_event("schedule-default"), "detail": {"batchId": "A"}},
        {**load_event("schedule-default"), "detail-type": "Object Created"},
    ],
    ids=["fields missing", "bad time", "bad detail", "detail not empty", "not a tick"],
)
def test_malformed_scheduled_event_is_refused(handler_app, conn, queue, event):
    before = db.table_state(conn)

    answer, _ = invoke(handler_app, event)

    assert answer["error"] == "invalid_request"
    assert answer["problems"]
    assert db.table_state(conn) == before


# ------------------------------------------------------------------ secrets


def test_logs_never_show_the_password_or_the_connection_string(
    handler_app, monkeypatch, capsys, caplog, tmp_path
):
    # GIVEN a DATABASE_URL with a password, for a server that cannot be reached
    password = "S3cret-Pa55word"
    url = f"postgresql://queue_user:{password}@/queue?host={tmp_path}/nowhere"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("CONNECT_TIMEOUT_SECONDS", "1")

    # WHEN the Function URL and a direct invoke are tried
    response, _ = invoke(handler_app, load_event("function-url-process-task"))
    with pytest.raises(Exception) as raised:
        invoke(handler_app, load_event("direct-invoke"))

    # THEN they fail as unavailable, and nothing written anywhere shows the secret
    assert response["statusCode"] == 503
    captured = capsys.readouterr()
    written = captured.out + captured.err + caplog.text + response["body"]
    written += str(raised.value) + repr(raised.value)
    assert password not in written
    assert url not in written
    assert "queue_user:" not in written


def test_every_refusal_is_counted_in_the_invalid_requests_metric(
    handler_app, conn, queue, capsys
):
    # WHEN a bad Function URL request and a bad direct invoke arrive
    invoke(handler_app, function_url_event('{"batchId": 5}'))
    invoke(handler_app, {"batchId": "no spaces"})

    # THEN each flushed an InvalidRequests metric of 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    counted = [line["InvalidRequests"] for line in lines if "InvalidRequests" in line]
    assert counted == [[1.0], [1.0]] or counted == [1.0, 1.0]
