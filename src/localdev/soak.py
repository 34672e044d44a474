"""`make soak`: many workers, many batches, thousands of tasks, and faults all along.

Worker processes work a fresh queue (some tasks fail on purpose, a few kill their
worker) while a chaos thread SIGKILLs workers, freezes them with SIGSTOP/SIGCONT (often
past the lease) and ends their sessions with pg_terminate_backend. When the queue is
empty, or the time is up, it checks what the database committed (kept by triggers in the
soak's own database) against what the workers' processors recorded:

- nothing lost: every enqueued task was completed once, or dead-lettered;
- order: per batch, completions follow "Id" order;
- one owner at a time: per batch, no task was deleted under a fencing token after a
  newer one had been issued, and no two committed processing intervals overlap;
- reprocessing: starts beyond the first and the deliberate failures are no more than the
  faults injected (each can cut short at most the one task its worker had in flight).

Its last line states these figures. Exit status 0 when all hold.
"""

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg import conninfo, sql

from localdev import audit
from queue_core.queries import load_named

SOAK_SQL = Path(__file__).with_name("soak.sql")
SOAK_DATABASE = "task_queue_soak"


def q(name: str) -> str:
    return load_named(SOAK_SQL)[name]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker_slot is not None:
        return _worker_process(args)
    return Soak(args).run()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument(
        "--seconds",
        type=float,
        default=150,
        help="how long tasks are enqueued and faults injected; then the queue must "
        "drain within max(60 s, 10 leases)",
    )
    parser.add_argument("--lease", type=float, default=4.0, help="lease, seconds")
    parser.add_argument(
        "--chaos-every",
        default="0.3-1.2",
        help="seconds between faults, low-high (default 0.3-1.2)",
    )
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="use DATABASE_URL's database as it is (it must hold no tasks)",
    )
    parser.add_argument("--work-dir", help="where records and logs go (default: temp)")
    parser.add_argument("--worker-slot", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------ the worker side

_current_worker = ""


def _worker_process(args) -> int:
    """Work the queue like a stream of Lambda invocations, until killed."""
    global _current_worker
    from queue_core import ConnectionHolder, Settings, Worker

    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(message)s"
    )
    settings = Settings.from_env()
    connections = ConnectionHolder.for_settings(
        settings, application_name=f"soak-worker-{args.worker_slot}"
    )
    recorder = _Recorder(args.records)
    worker = Worker(connections, settings, recorder.process)
    chooser = random.Random()
    for sequence in range(1, 10**9):
        _current_worker = f"w{args.worker_slot}.{os.getpid()}.{sequence}"
        deadline = time.monotonic() + chooser.uniform(1.0, 4.0)
        try:
            report = worker.run(
                _current_worker, time_left=lambda d=deadline: d - time.monotonic()
            )
        except Exception as error:  # the next invocation starts afresh
            logging.warning("invocation failed: %s", type(error).__name__)
            time.sleep(0.2)
            continue
        if report.outcome in ("no_work", "batch_busy", "head_waiting"):
            time.sleep(chooser.uniform(0.02, 0.15))
    return 0


class _Recorder:
    """The processor: records each start and end (one write() each, O_APPEND)."""

    def __init__(self, path: str) -> None:
        self._path = path

    def process(self, task) -> None:
        payload = task.payload
        self._write(task, "start")
        if task.attempt <= payload.get("die_attempts", 0):
            self._write(task, "die")
            os.kill(os.getpid(), signal.SIGKILL)
        if payload.get("fail_always") or task.attempt <= payload.get(
            "fail_attempts", 0
        ):
            self._write(task, "fail")
            raise RuntimeError(
                f"task {task.id} fails on purpose, attempt {task.attempt}"
            )
        time.sleep(payload.get("ms", 0) / 1000)
        self._write(task, "end")

    def _write(self, task, event: str) -> None:
        line = {
            "event": event,
            "task_id": task.id,
            "batch_id": task.batch_id,
            "attempt": task.attempt,
            "worker": _current_worker,
            "at": datetime.now().astimezone().isoformat(),
        }
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)


# ------------------------------------------------------------------ the supervisor


@dataclass
class Faults:
    kills: int = 0
    freezes: int = 0
    freezes_past_lease: int = 0
    connection_kills: int = 0
    task_crashes: int = 0  # workers killed by their own task, on purpose

    @property
    def injected(self) -> int:
        return self.kills + self.freezes + self.connection_kills


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.faults = Faults()
        self.lock = threading.Lock()
        self.workers: dict[int, subprocess.Popen] = {}
        self.frozen: set[int] = set()
        self.killed_by_chaos: set[int] = set()
        self.stop_chaos = threading.Event()
        self.work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="queue-soak-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.records = self.work_dir / "records.jsonl"

    def run(self) -> int:
        started = time.monotonic()
        self.url = self._database()
        self._prepare()
        print(
            f"soak: {self.args.tasks} tasks over {self.args.batches} batches, "
            f"enqueued in waves for {self.args.seconds:g} s while faults are "
            f"injected; {self.args.workers} workers, lease {self.args.lease:g} s; "
            f"records in {self.work_dir}",
            flush=True,
        )

        for slot in range(self.args.workers):
            self._start_worker(slot)
        chaos = threading.Thread(target=self._chaos, daemon=True)
        producer = threading.Thread(target=self._produce, daemon=True)
        chaos.start()
        producer.start()
        self._supervise(started, until=started + self.args.seconds, drain=False)
        producer.join()
        self.stop_chaos.set()
        chaos.join(timeout=30)
        drain_bound = time.monotonic() + max(60.0, 10 * self.args.lease)
        drained = self._supervise(started, until=drain_bound, drain=True)
        self._stop_workers()

        findings = self._check(len(self.enqueued), self.expected_dead, drained)
        elapsed = time.monotonic() - started
        return self._report(findings, elapsed)

    # -- setting up

    def _database(self) -> str:
        base = os.environ["DATABASE_URL"]
        if self.args.in_place:
            return base
        with psycopg.connect(base, autocommit=True) as conn:
            name = sql.Identifier(SOAK_DATABASE)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name)
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
        return conninfo.make_conninfo(base, dbname=SOAK_DATABASE)

    def _prepare(self) -> None:
        """Migrate and install the audit triggers, on a queue that must be empty."""
        from queue_core import migrate

        with psycopg.connect(self.url, autocommit=True) as conn:
            migrate(conn)
            conn.execute(q("install_audit"))
            pending = conn.execute(q("pending_count")).fetchone()[0]
        if pending:
            raise SystemExit(f"soak: the database already holds {pending} tasks")
        self.enqueued: set[int] = set()
        self.expected_dead: set[int] = set()

    def _produce(self) -> None:
        """Enqueue the tasks in waves, over most of the run, as producers would."""
        from queue_core import enqueue_many

        batches = [f"soak-{n:02d}" for n in range(self.args.batches)]
        waves = max(1, int(self.args.seconds * 0.95 / 0.5))
        per_wave = -(-self.args.tasks // waves)
        left = self.args.tasks
        with psycopg.connect(self.url, autocommit=True) as conn:
            while left > 0:
                size = min(per_wave, left)
                tasks, dying = [], []
                for _ in range(size):
                    payload, always_fails = self._payload()
                    tasks.append((self.rng.choice(batches), payload))
                    dying.append(always_fails)
                with conn.transaction():
                    ids = enqueue_many(conn, tasks)
                self.enqueued.update(ids)
                self.expected_dead.update(
                    i for i, dies in zip(ids, dying, strict=True) if dies
                )
                left -= size
                if self.stop_chaos.wait(0.5):
                    break

    def _payload(self) -> tuple[dict, bool]:
        """A task's payload, and whether it is meant to end as a dead letter."""
        payload: dict = {"ms": self.rng.randint(2, 15)}
        draw = self.rng.random()
        if draw < 0.01:
            payload["fail_always"] = True
        elif draw < 0.04:
            payload["fail_attempts"] = self.rng.randint(1, self.args.max_attempts - 1)
        elif draw < 0.043:
            payload["die_attempts"] = 1
        return payload, bool(payload.get("fail_always"))

    # -- workers and faults

    def _environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.url,
            "LEASE_TIMEOUT_SECONDS": str(self.args.lease),
            "TASK_BUDGET_SECONDS": "0.2",
            "SAFETY_MARGIN_SECONDS": "0.2",
            "RETRY_BASE_SECONDS": "0.05",
            "RETRY_MAX_SECONDS": "0.5",
            "MAX_ATTEMPTS": str(self.args.max_attempts),
            "ON_EXHAUSTED": "dead-letter",
        }

    def _start_worker(self, slot: int) -> None:
        command = [
            sys.executable,
            "-m",
            "localdev.soak",
            "--worker-slot",
            str(slot),
            "--records",
            str(self.records),
        ]
        with open(self.work_dir / f"worker-{slot}.log", "ab") as log:
            self.workers[slot] = subprocess.Popen(
                command,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def _chaos(self) -> None:
        low, _, high = self.args.chaos_every.partition("-")
        with psycopg.connect(self.url, autocommit=True) as admin:
            while not self.stop_chaos.wait(self.rng.uniform(float(low), float(high))):
                slot = self.rng.randrange(self.args.workers)
                action = self.rng.choice(["kill", "freeze", "terminate"])
                with self.lock:
                    if slot in self.frozen:
                        continue
                    if action == "kill":
                        self.workers[slot].kill()
                        self.killed_by_chaos.add(slot)
                        self.faults.kills += 1
                    elif action == "freeze":
                        self._freeze(slot)
                if action == "terminate":
                    ended = admin.execute(
                        q("terminate_worker"),
                        {"application_name": f"soak-worker-{slot}"},
                    ).fetchone()[0]
                    with self.lock:
                        self.faults.connection_kills += ended

    def _freeze(self, slot: int) -> None:
        """SIGSTOP now, SIGCONT later (often past the lease). Caller holds the lock."""
        seconds = self.rng.uniform(0.2, 1.6 * self.args.lease)
        process = self.workers[slot]
        process.send_signal(signal.SIGSTOP)
        self.frozen.add(slot)
        self.faults.freezes += 1
        self.faults.freezes_past_lease += seconds > self.args.lease

        def thaw() -> None:
            with self.lock:
                process.send_signal(signal.SIGCONT)
                self.frozen.discard(slot)

        timer = threading.Timer(seconds, thaw)
        timer.daemon = True
        timer.start()

    def _supervise(self, started: float, until: float, drain: bool) -> bool:
        """Restart dead workers and show progress until the time given, or (drain)
        until the queue is empty; whether it is."""
        bound = until
        last_progress = 0.0
        with psycopg.connect(self.url, autocommit=True) as observer:
            while time.monotonic() < bound:
                with self.lock:
                    for slot, process in list(self.workers.items()):
                        if process.poll() is None:
                            continue
                        if slot in self.killed_by_chaos:
                            self.killed_by_chaos.discard(slot)
                        else:
                            self.faults.task_crashes += 1
                        self._start_worker(slot)
                pending = observer.execute(q("pending_count")).fetchone()[0]
                now = time.monotonic()
                if now - last_progress >= 5:
                    last_progress = now
                    print(
                        f"  {now - started:6.1f}s  enqueued {len(self.enqueued):>6}  "
                        f"pending {pending:>6}  "
                        f"kills {self.faults.kills}  freezes {self.faults.freezes}  "
                        f"connection kills {self.faults.connection_kills}  "
                        f"task crashes {self.faults.task_crashes}",
                        flush=True,
                    )
                if drain and pending == 0:
                    return True
                time.sleep(0.3)
        return not drain

    def _stop_workers(self) -> None:
        with self.lock:
            for process in self.workers.values():
                process.send_signal(signal.SIGCONT)
                process.kill()
            for process in self.workers.values():
                process.wait(timeout=30)
            self.frozen.clear()

    # -- checking

    def _check(self, total: int, expected_dead: set[int], drained: bool) -> Findings:
        findings = Findings()
        with psycopg.connect(self.url, autocommit=True) as conn:
            events = conn.execute(q("audit_events")).fetchall()
            dead = {row[0]: row for row in conn.execute(q("dead_letters"))}
            pending = conn.execute(q("pending_count")).fetchone()[0]
        records = _read_records(self.records)

        deletes = [e for e in events if e[0] == "delete"]
        completions = [e for e in deletes if e[1] not in dead]
        completed_ids = Counter(e[1] for e in completions)
        self._check_nothing_lost(findings, completed_ids, dead, pending, drained)
        self._check_dead_letters(findings, dead, expected_dead)
        self._check_order_and_fencing(findings, events, completions)
        self._check_processing(findings, records, completions, events, dead)
        findings.figures.update(
            tasks=total,
            completed=len(completed_ids),
            dead_lettered=len(dead),
            pending=pending,
        )
        return findings

    def _check_nothing_lost(self, findings, completed_ids, dead, pending, drained):
        twice = [i for i, n in completed_ids.items() if n > 1]
        if twice:
            findings.problems.append(f"completed more than once: {twice[:10]}")
        both = set(completed_ids) & set(dead)
        if both:
            findings.problems.append(f"both completed and dead-lettered: {both}")
        lost = self.enqueued - set(completed_ids) - set(dead)
        if pending:
            findings.problems.append(f"{pending} tasks still pending at the end")
        elif lost:
            findings.problems.append(f"lost: {sorted(lost)[:10]} ({len(lost)} in all)")
        if not drained:
            findings.problems.append("the queue was not drained within the time bound")
        findings.figures["lost"] = 0 if pending else len(lost)

    def _check_dead_letters(self, findings, dead, expected_dead):
        unexpected = [row for i, row in dead.items() if i not in expected_dead]
        # A task that fails a few times on purpose may still run out of attempts when
        # faults cut short its other starts; that is the policy working, not a loss.
        findings.figures["dead_lettered_beyond_poison"] = len(unexpected)
        missing = expected_dead - set(dead)
        if missing:
            findings.problems.append(
                f"always-failing tasks not dead-lettered: {sorted(missing)[:10]}"
            )
        too_early = [
            row
            for row in dead.values()
            if row[3] == "failed" and row[2] < self.args.max_attempts
        ]
        if too_early:
            findings.problems.append(f"dead-lettered before max attempts: {too_early}")

    def _check_order_and_fencing(self, findings, events, completions):
        by_batch = defaultdict(list)
        for event in completions:
            by_batch[event[2]].append(event[1])
        disordered = [batch for batch, ids in by_batch.items() if ids != sorted(ids)]
        if disordered:
            findings.problems.append(f"completions out of Id order in {disordered}")
        findings.figures["batches_in_order"] = (
            f"{len(by_batch) - len(disordered)}/{len(by_batch)}"
        )

        claims = defaultdict(list)  # batch -> [(token, at)]
        for kind, _task, batch, token, _owner, at in events:
            if kind == "claim":
                claims[batch].append((token, at))
        late_writes = 0
        for _kind, task_id, batch, token, _owner, at in completions:
            if any(t > token and claimed_at < at for t, claimed_at in claims[batch]):
                late_writes += 1
                findings.problems.append(
                    f"batch {batch}: task {task_id} deleted under token {token} after "
                    "a newer token was issued"
                )
        findings.figures["owner_overlaps"] = late_writes

    def _check_processing(self, findings, records, completions, events, dead):
        owners = {(e[2], e[3]): e[4] for e in events if e[0] == "claim"}
        runs = {}
        for record in records:
            key = (record["task_id"], record["worker"])
            if record["event"] == "start":
                runs[key] = {"start": record["at"], "attempt": record["attempt"]}
            elif record["event"] == "end" and key in runs:
                runs[key]["end"] = record["at"]

        committed = []
        for _kind, task_id, batch, token, _owner, _at in completions:
            owner = owners.get((batch, token))
            run = runs.get((task_id, owner))
            if run is None or "end" not in run:
                findings.problems.append(
                    f"task {task_id} completed under {owner} without a finished run"
                )
                continue
            committed.append(
                audit.Completion(
                    task_id=task_id,
                    batch_id=batch,
                    worker_id=owner,
                    attempt=run["attempt"],
                    started_at=datetime.fromisoformat(run["start"]),
                    completed_at=datetime.fromisoformat(run["end"]),
                )
            )
        verdict = audit.check(committed)
        findings.problems.extend(verdict.overlaps[:10])
        findings.figures["processing_overlaps"] = len(verdict.overlaps)

        starts = Counter(r["task_id"] for r in records if r["event"] == "start")
        deliberate = Counter(
            r["task_id"] for r in records if r["event"] in ("fail", "die")
        )
        completed = {c.task_id for c in committed}
        extra = {
            task_id: count - deliberate[task_id] - (task_id in completed)
            for task_id, count in starts.items()
        }
        reprocessed = {task_id: n for task_id, n in extra.items() if n > 0}
        extra_starts = sum(reprocessed.values())
        findings.figures["reprocessed_tasks"] = len(reprocessed)
        findings.figures["extra_starts"] = extra_starts
        if extra_starts > self.faults.injected:
            findings.problems.append(
                f"{extra_starts} starts beyond the first and the deliberate failures, "
                f"more than the {self.faults.injected} faults injected"
            )

    def _report(self, findings: Findings, elapsed: float) -> int:
        figures, faults = findings.figures, self.faults
        for problem in findings.problems[:30]:
            print(f"  PROBLEM: {problem}")
        verdict = "SOAK OK" if not findings.problems else "SOAK FAILED"
        print(
            f"{verdict}: {figures['tasks']} tasks: {figures['completed']} completed, "
            f"{figures['dead_lettered']} dead-lettered, {figures['lost']} lost, "
            f"{figures['pending']} pending; order kept in "
            f"{figures['batches_in_order']} batches; owner overlaps "
            f"{figures['owner_overlaps']}, processing overlaps "
            f"{figures['processing_overlaps']}; reprocessed "
            f"{figures['reprocessed_tasks']} tasks ({figures['extra_starts']} extra "
            f"starts) <= {faults.injected} faults ({faults.kills} kills, "
            f"{faults.freezes} freezes of which {faults.freezes_past_lease} past the "
            f"lease, {faults.connection_kills} connection kills); "
            f"{faults.task_crashes} deliberate task crashes; {elapsed:.1f} s",
            flush=True,
        )
        return 0 if not findings.problems else 1


def _read_records(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as stream:
            return [json.loads(line) for line in stream if line.strip()]
    except FileNotFoundError:
        return []


if __name__ == "__main__":
    sys.exit(main())
