"""The completion-log check used by `make run` and the soak."""

from datetime import UTC, datetime, timedelta

from localdev import audit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def completion(task_id, worker, start, finish, logged, batch="A"):
    return audit.Completion(
        task_id=task_id,
        batch_id=batch,
        worker_id=worker,
        attempt=1,
        started_at=T0 + timedelta(milliseconds=start),
        completed_at=T0 + timedelta(milliseconds=logged),
        finished_at=T0 + timedelta(milliseconds=finish),
    )


def test_a_late_completion_log_line_is_no_overlap():
    # GIVEN task 1 processed 0-10 ms, its commit logged late (300 ms), and task 2
    # processed by another worker from 20 ms
    done = [completion(1, "w1", 0, 10, 300), completion(2, "w2", 20, 30, 35)]

    # THEN order and ownership held
    verdict = audit.check(done)
    assert verdict.held


def test_overlapping_processing_and_order_violations_are_reported():
    # GIVEN two workers processing batch A at once, and a later id started first
    done = [completion(2, "w1", 0, 50, 55), completion(1, "w2", 20, 30, 35)]

    # THEN both are reported
    verdict = audit.check(done)
    assert verdict.overlaps and verdict.order_violations
    assert not verdict.held
