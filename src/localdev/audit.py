"""Checks the completion log ("task_completed" lines) for order and ownership."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise


@dataclass(frozen=True)
class Completion:
    task_id: int
    batch_id: str
    worker_id: str
    attempt: int
    started_at: datetime
    completed_at: datetime
    # When the processor returned, before the commit (completed_at follows the commit
    # and its log line, which may lag): the end of the processing interval.
    finished_at: datetime | None = None

    @classmethod
    def from_log(cls, record: dict) -> "Completion":
        return cls(
            task_id=int(record["task_id"]),
            batch_id=record["batch_id"],
            worker_id=record["worker_id"],
            attempt=int(record["attempt"]),
            started_at=datetime.fromisoformat(record["started_at"]),
            completed_at=datetime.fromisoformat(record["completed_at"]),
            finished_at=datetime.fromisoformat(
                record.get("finished_at") or record["completed_at"]
            ),
        )


@dataclass
class Verdict:
    completions: int = 0
    order_violations: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return not (self.order_violations or self.overlaps or self.duplicates)


def by_batch(completions: list[Completion]) -> dict[str, list[Completion]]:
    """Completions of each batch, in the order they started (starts within a batch
    follow each other's commits, so this is also the order of the commits)."""
    batches: dict[str, list[Completion]] = defaultdict(list)
    for completion in sorted(completions, key=lambda c: c.started_at):
        batches[completion.batch_id].append(completion)
    return dict(sorted(batches.items()))


def check(completions: list[Completion]) -> Verdict:
    verdict = Verdict(completions=len(completions))
    seen: set[int] = set()
    for completion in completions:
        if completion.task_id in seen:
            verdict.duplicates.append(completion.task_id)
        seen.add(completion.task_id)

    for batch_id, done in by_batch(completions).items():
        for earlier, later in pairwise(done):
            if later.task_id < earlier.task_id:
                verdict.order_violations.append(
                    f"batch {batch_id}: task {later.task_id} completed after "
                    f"{earlier.task_id}"
                )
            if later.started_at < (earlier.finished_at or earlier.completed_at):
                verdict.overlaps.append(
                    f"batch {batch_id}: task {later.task_id} ({later.worker_id}) "
                    "started before "
                    f"task {earlier.task_id} ({earlier.worker_id}) finished"
                )
    return verdict
