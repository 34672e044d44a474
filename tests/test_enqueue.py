"""Adding tasks: ids in order, in the caller's transaction, bad input refused whole."""

import decimal
import math

import psycopg
import pytest

from queue_core import InvalidInput, enqueue, enqueue_many
from queue_core.validation import MAX_PAYLOAD_DEPTH
from tests.support import db


def nested(depth: int):
    """A payload of lists nested depth levels deep."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_enqueue_one_returns_its_id_and_stores_the_payload(conn):
    # WHEN one task is enqueued
    task_id = enqueue(conn, "tenant-42:orders.v2", {"order": 7, "note": "é ✓"})

    # THEN it is stored as given, not yet started, in a batch with a free lease
    task = db.task(conn, task_id)
    assert task["BatchId"] == "tenant-42:orders.v2"
    assert task["Payload"] == {"order": 7, "note": "é ✓"}
    assert (task["Attempts"], task["NotBefore"], task["LastError"]) == (0, None, None)
    lease = db.lease(conn, "tenant-42:orders.v2")
    assert (lease["LockedBy"], lease["FencingToken"]) == (None, 0)


def test_enqueue_many_returns_ids_in_the_order_given(conn):
    # GIVEN tasks for several batches, interleaved
    tasks = [(batch, {"n": n}) for n in range(5) for batch in ("B", "A", "C")]

    # WHEN they are enqueued in one call
    ids = enqueue_many(conn, tasks)

    # THEN the ids rise in the order given, and each id holds its own task
    assert ids == sorted(ids) and len(set(ids)) == len(tasks)
    stored = conn.execute('SELECT "Id", "BatchId", "Payload" FROM "Tasks"').fetchall()
    assert {row[0]: (row[1], row[2]) for row in stored} == dict(
        zip(ids, tasks, strict=True)
    )


def test_later_calls_get_higher_ids(conn):
    # WHEN tasks are enqueued by one call, then by another
    first = enqueue(conn, "A", {})
    second = enqueue_many(conn, [("A", {}), ("B", {})])

    # THEN the later call's ids are higher, whatever the batch
    assert first < second[0] < second[1]


def test_enqueue_is_part_of_the_callers_transaction(conn):
    # GIVEN the caller's own transaction
    with pytest.raises(RuntimeError), conn.transaction():
        # WHEN it enqueues, then fails and rolls back
        enqueue(conn, "A", {"n": 1})
        enqueue_many(conn, [("new-batch", {"n": 2})])
        raise RuntimeError("the caller's own work failed")

    # THEN neither the tasks nor their new batches remain
    assert db.table_state(conn) == {"tasks": [], "leases": []}


def test_enqueue_commits_with_the_callers_transaction(db_url, conn):
    # GIVEN a connection that is not autocommit
    with psycopg.connect(db_url) as caller:
        task_id = enqueue(caller, "A", {"n": 1})

        # THEN nothing is visible before the caller commits
        assert db.pending_ids(conn) == []
        caller.commit()

    # AND the task is there after
    assert db.pending_ids(conn) == [task_id]


BAD_TASKS = {
    "empty batch": (("", {}), "tasks[0].batchId"),
    "batch with a space": (("a b", {}), "tasks[0].batchId"),
    "batch with a slash": (("a/b", {}), "tasks[0].batchId"),
    "batch of 65 characters": (("a" * 65, {}), "tasks[0].batchId"),
    "batch not a string": ((5, {}), "tasks[0].batchId"),
    "batch None": ((None, {}), "tasks[0].batchId"),
    "NUL in a value": (("A", {"text": "a\x00b"}), "tasks[0].payload"),
    "NUL in a key": (("A", {"a\x00": 1}), "tasks[0].payload"),
    "NUL deep inside": (("A", [{"a": ["b", "c\x00"]}]), "tasks[0].payload"),
    "lone surrogate": (("A", {"text": "\ud800"}), "tasks[0].payload"),
    "not serializable": (("A", {"when": object()}), "tasks[0].payload"),
    "a set": (("A", {1, 2}), "tasks[0].payload"),
    "a decimal": (("A", decimal.Decimal("1.5")), "tasks[0].payload"),
    "NaN": (("A", {"x": math.nan}), "tasks[0].payload"),
    "infinity": (("A", [math.inf]), "tasks[0].payload"),
    "too deep": (("A", nested(MAX_PAYLOAD_DEPTH + 1)), "tasks[0].payload"),
    "far too deep": (("A", nested(100_000)), "tasks[0].payload"),
    "too large": (("A", "x" * 1024), "tasks[0].payload"),
    "SQL in the batch": (('A\'; DROP TABLE "Tasks"; --', {}), "tasks[0].batchId"),
    "NUL in the batch": (("A\x00", {}), "tasks[0].batchId"),
    "batch a list": ((["A"], {}), "tasks[0].batchId"),
    "bytes": (("A", b"\xff\xfe"), "tasks[0].payload"),
    "bytes in a value": (("A", {"x": b"abc"}), "tasks[0].payload"),
    "lone surrogate in a key": (("A", {"\udc80": 1}), "tasks[0].payload"),
    "too large with multibyte text": (("A", "é" * 600), "tasks[0].payload"),
}


@pytest.mark.parametrize(("task", "field"), BAD_TASKS.values(), ids=BAD_TASKS.keys())
def test_bad_task_is_refused_naming_the_field_and_nothing_is_written(conn, task, field):
    # GIVEN a call whose third task breaks a rule, after two good ones
    tasks = [("A", {"n": 0}), ("B", {"n": 1}), task]

    # WHEN it is enqueued (with a 1 KiB payload limit)
    with pytest.raises(InvalidInput) as refused:
        enqueue_many(conn, tasks, max_payload_bytes=1024)

    # THEN the error names the field, and nothing at all was written
    expected_field = field.replace("[0]", "[2]")
    assert refused.value.field == expected_field
    assert str(refused.value).startswith(f"{expected_field}: ")
    assert db.table_state(conn) == {"tasks": [], "leases": []}


def test_enqueue_one_names_the_field_too(conn):
    # WHEN a single task of a badly named batch is enqueued
    with pytest.raises(InvalidInput) as refused:
        enqueue(conn, "bad batch", {})

    # THEN the error names the batch id, and nothing was written
    assert "batchId" in refused.value.field
    assert db.table_state(conn) == {"tasks": [], "leases": []}


def test_payload_limits_are_inclusive(conn):
    # GIVEN a payload of exactly the byte limit, and one nested as deep as allowed
    exact = "x" * (1024 - 2)  # two quotes around it

    # WHEN they are enqueued
    ids = enqueue_many(
        conn, [("A", exact), ("A", nested(MAX_PAYLOAD_DEPTH))], max_payload_bytes=1024
    )

    # THEN both are accepted and stored as given
    assert [db.task(conn, i)["Payload"] for i in ids] == [exact, nested(32)]


def test_no_tasks_is_refused(conn):
    # WHEN no tasks at all are enqueued
    with pytest.raises(InvalidInput) as refused:
        enqueue_many(conn, [])

    # THEN the call is refused, naming the list
    assert refused.value.field == "tasks"


def test_unusual_but_valid_payloads_are_stored_as_given(conn):
    # GIVEN payloads that are not objects, or hold unusual text
    payloads = [None, 0, "text", [1, "two"], {"emoji": "🦆", "quote": '"'}]

    # WHEN they are enqueued
    ids = enqueue_many(conn, [("A", payload) for payload in payloads])

    # THEN each is read back unchanged
    assert [db.task(conn, i)["Payload"] for i in ids] == payloads


def test_backslash_u0000_text_without_a_nul_is_accepted(conn):
    # GIVEN a payload whose string holds the six characters \u0000, but no NUL
    payload = {"pattern": "\\u0000", "\\u0000 key": 1}

    # WHEN it is enqueued
    task_id = enqueue(conn, "A", payload)

    # THEN it is stored as given (PostgreSQL accepts it)
    assert db.task(conn, task_id)["Payload"] == payload
