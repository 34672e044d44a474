"""The seven parts of the benchmark. Each returns plain data for the JSON file."""

import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench import peers
from bench.cost import cost_model
from bench.probe import through, upstream
from bench.proxy import CountingProxy
from bench.report import OURS, SYSTEMS
from bench.workers import LOOPS, run_child

REPO_ROOT = Path(__file__).resolve().parents[1]


def spread(samples: list[float]) -> dict[str, float]:
    """Median, min and max (and p99 when there are enough samples)."""
    ordered = sorted(samples)
    out = {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }
    if len(ordered) >= 20:
        out["p99"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return out


class Bench:
    def __init__(
        self, server_url: str, prefix: str, sizes: dict, mode: str, peers: bool
    ) -> None:
        self.server_url = server_url
        self.sizes = sizes
        self.mode = mode
        self.with_peers = peers
        self.names = {
            "queue": prefix,
            "pgqueuer": f"{prefix}_pgqueuer",
            "procrastinate": f"{prefix}_procrastinate",
        }
        self.urls = {
            key: make_conninfo(server_url, dbname=name)
            for key, name in self.names.items()
        }
        self._create_databases()
        self.conn = psycopg.connect(self.urls["queue"], autocommit=True)

    # ------------------------------------------------------------------ plumbing

    def _create_databases(self) -> None:
        from queue_core import migrate

        with psycopg.connect(self.server_url, autocommit=True) as admin:
            for name in self.names.values():
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)
                    )
                )
                admin.execute(
                    sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                )
        with psycopg.connect(self.urls["queue"], autocommit=True) as conn:
            migrate(conn)

    def close(self) -> None:
        self.conn.close()
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            for name in self.names.values():
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)
                    )
                )

    def _reset_queue(self) -> None:
        self.conn.execute('TRUNCATE "Tasks", "DeadLetters", "BatchLocks"')

    def _fill(self, batches: int, tasks: int, spread_seconds: int = 3600) -> None:
        """batches lease rows, least recently worked spread over the past hour, and
        tasks spread round-robin over the first min(batches, tasks) of them."""
        self._reset_queue()
        self.conn.execute(
            """INSERT INTO "BatchLocks" ("BatchId", "LockedAt")
               SELECT 'b' || n, now() - random() * make_interval(secs => %s)
               FROM generate_series(0, %s - 1) AS n""",
            (spread_seconds, batches),
        )
        with_work = min(batches, tasks)
        for start in range(0, tasks, 200_000):
            self.conn.execute(
                """INSERT INTO "Tasks" ("BatchId")
                   SELECT 'b' || (n %% %s) FROM generate_series(%s, %s - 1) AS n
                   ORDER BY n""",
                (with_work, start, min(tasks, start + 200_000)),
            )
        self.conn.execute('VACUUM ANALYZE "BatchLocks"')
        self.conn.execute('VACUUM ANALYZE "Tasks"')

    def _pending(self) -> int:
        return self.conn.execute('SELECT count(*) FROM "Tasks"').fetchone()[0]

    def _processes(self, loop: str, url: str, workers: int, batches: list[str]):
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(workers)
        results = context.Queue()
        processes = [
            context.Process(
                target=run_child,
                args=(loop, url, number, workers, batches, barrier, results),
            )
            for number in range(workers)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=3600) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        failed = [text for ok, text in outcomes if not ok]
        if failed:
            raise RuntimeError(f"{loop} worker failed:\n{failed[0]}")
        return [value for _, value in outcomes]

    # ------------------------------------------------------------------ the parts

    def run_all(self) -> dict[str, Any]:
        results: dict[str, Any] = {"mode": self.mode, "machine": self.machine()}
        steps = [
            ("round_trips", self.round_trips),
            ("drain", self.drain),
            ("claim_latency", self.claim_latency),
            ("sustained", self.sustained),
            ("idle_tick", self.idle_tick),
            ("cold_start", self.cold_start),
        ]
        for name, step in steps:
            print(f"[bench] {name} ...", flush=True)
            started = time.perf_counter()
            results[name] = step()
            print(f"[bench] {name} done in {time.perf_counter() - started:.1f} s")
        results["cost"] = cost_model(results)
        return results

    def machine(self) -> dict[str, Any]:
        memory = "?"
        meminfo = Path("/proc/meminfo")
        if meminfo.exists():
            kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
            memory = f"{kib / 1024 / 1024:.1f} GiB"
        return {
            "nproc": os.cpu_count(),
            "memory": memory,
            "postgresql": self.conn.execute("SHOW server_version").fetchone()[0],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "sizes": self.sizes,
        }

    def drain(self) -> dict[str, Any]:
        """Part 1: tasks per second, draining drain_tasks, by system and size."""
        tasks = self.sizes["drain_tasks"]
        available = {
            "pgqueuer": peers.available("pgqueuer"),
            "procrastinate": peers.available("procrastinate"),
        }
        out: dict[str, Any] = {"tasks": tasks, "skipped": {}, "runs": []}
        for workers in (1, 4):
            for batch_count in (10, 100):
                batches = [f"b{n}" for n in range(batch_count)]
                row: dict[str, Any] = {"workers": workers, "batches": batch_count}
                for system in SYSTEMS:
                    peer = system.split("-")[0]
                    if peer in available:
                        why = available[peer] if self.with_peers else "--no-peers"
                        if why:
                            out["skipped"][system] = why
                            continue
                    try:
                        row[system] = self._drain_reps(system, workers, batches, tasks)
                    except Exception as error:  # a peer that fails here is reported
                        if system in OURS:
                            raise
                        out["skipped"][system] = f"{type(error).__name__}: {error}"
                raw = row["raw"]["median"]
                for system in SYSTEMS:
                    if system in row:
                        row[system]["ratio_to_raw"] = row[system]["median"] / raw
                out["runs"].append(row)
                print(f"[bench]   drain {workers}w x {batch_count}b: " + _brief(row))
        return out

    def _drain_reps(
        self, system: str, workers: int, batches: list[str], tasks: int
    ) -> dict[str, Any]:
        rates = []
        for _ in range(self.sizes["reps"]):
            url = self._prepare_drain(system, batches, tasks)
            loop = "procrastinate" if system.startswith("procrastinate") else system
            loop = "pgqueuer" if system == "pgqueuer" else loop
            timings = self._processes(loop, url, workers, batches)
            elapsed = max(t[1] for t in timings) - min(t[0] for t in timings)
            self._check_drained(system)
            rates.append(tasks / elapsed)
        return spread(rates)

    def _prepare_drain(self, system: str, batches: list[str], tasks: int) -> str:
        if system in OURS:
            self._fill(len(batches), tasks, spread_seconds=1)
            return self.urls["queue"]
        if system == "pgqueuer":
            peers.prepare_pgqueuer(self.urls["pgqueuer"], tasks)
            return self.urls["pgqueuer"]
        peers.prepare_procrastinate(
            self.urls["procrastinate"], batches, tasks, lock=system.endswith("lock")
        )
        return self.urls["procrastinate"]

    def _check_drained(self, system: str) -> None:
        if system in OURS:
            left = self._pending()
        elif system == "pgqueuer":
            with psycopg.connect(self.urls["pgqueuer"]) as conn:
                left = conn.execute("SELECT count(*) FROM pgqueuer").fetchone()[0]
        else:
            with psycopg.connect(self.urls["procrastinate"]) as conn:
                left = conn.execute(
                    "SELECT count(*) FROM procrastinate_jobs"
                    " WHERE status <> 'succeeded'"
                ).fetchone()[0]
        if left:
            raise RuntimeError(f"{system} left {left} tasks undone")

    def round_trips(self) -> dict[str, Any]:
        """Part 2: round trips and statements per task, through a counting proxy."""
        tasks = max(100, self.sizes["drain_tasks"] // 5)
        batches = [f"b{n}" for n in range(10)]
        proxy = CountingProxy(upstream(self.urls["queue"]))
        url = through(self.urls["queue"], proxy)
        out: dict[str, Any] = {"tasks": tasks, "batches": len(batches)}
        try:
            for system in ("project", "raw"):
                self._fill(len(batches), tasks, spread_seconds=1)
                proxy.reset()
                _in_process(system, url, batches, proxy)
                counts = proxy.reset()
                out[system] = {
                    "round_trips_per_task": counts.round_trips / tasks,
                    "statements_per_task": counts.statements / tasks,
                }
        finally:
            proxy.close()
        with psycopg.connect(self.urls["queue"], autocommit=True) as conn:
            samples = []
            for _ in range(1000):
                started = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                samples.append(time.perf_counter() - started)
        out["select_1_seconds"] = spread(samples)
        return out

    def claim_latency(self) -> dict[str, Any]:
        """Part 3: one claim statement, rolled back, over a grid of sizes; on a
        connection that prepares statements (the worker's) and on one that does not
        (behind a transaction pooler). The plan of the largest case is kept."""
        from queue_core.queries import query

        params = {
            "worker_id": "bench",
            "lease_seconds": 300,
            "preferred_batch_id": None,
            "busy_batch_ids": [],
            "max_attempts": 5,
            "on_exhausted": "dead-letter",
        }
        claim = query("claim_batch")
        cases = []
        with (
            psycopg.connect(self.urls["queue"], autocommit=True) as prepared,
            psycopg.connect(
                self.urls["queue"], autocommit=True, prepare_threshold=None
            ) as unprepared,
        ):
            prepared.prepare_threshold = 0
            for batches in self.sizes["claim_batches"]:
                for tasks in self.sizes["claim_tasks"]:
                    self._fill(batches, tasks)
                    case: dict[str, Any] = {"batches": batches, "tasks": tasks}
                    for key, conn in (
                        ("seconds", prepared),
                        ("unprepared_seconds", unprepared),
                    ):
                        case[key] = self._claim_samples(conn, claim, params)
                    cases.append(case)
                    print(
                        f"[bench]   claim {batches} batches {tasks} tasks: median "
                        f"{case['seconds']['median'] * 1000:.3f} ms "
                        f"({case['unprepared_seconds']['median'] * 1000:.3f} "
                        "unprepared)"
                    )
            plan = _explained(unprepared, claim, params)
            late = self._late_batch(prepared, claim, params)
        medians = [case["seconds"]["median"] for case in cases]
        return {
            "cases": cases,
            "largest_over_smallest": medians[-1] / medians[0],
            "plan_of_largest": plan,
            "late_batch": late,
        }

    def _claim_samples(self, conn: psycopg.Connection, claim: str, params: dict):
        samples = []
        for _ in range(self.sizes["claim_samples"]):
            conn.execute("BEGIN")
            started = time.perf_counter()
            row = conn.execute(claim, params).fetchone()
            samples.append(time.perf_counter() - started)
            _rollback_keeping_prepared(conn)
            assert row is not None and row[2] is not None, row
        return spread(samples)

    def _late_batch(self, conn: psycopg.Connection, claim: str, params: dict):
        """Claims of a batch whose 10 tasks came after a backlog of the largest size
        in 10 other batches, so that its head sits behind all of it in "Id" order."""
        backlog = max(self.sizes["claim_tasks"])
        self._fill(10, backlog)
        self.conn.execute(
            """INSERT INTO "BatchLocks" ("BatchId", "LockedAt")
               VALUES ('late', now() - interval '1 day')"""
        )
        self.conn.execute(
            """INSERT INTO "Tasks" ("BatchId")
               SELECT 'late' FROM generate_series(1, 10)"""
        )
        self.conn.execute('VACUUM ANALYZE "Tasks"')
        self.conn.execute("BEGIN")
        first = self.conn.execute(claim, params).fetchone()
        self.conn.execute("ROLLBACK")
        assert first[0] == "late", first  # the least recently worked
        seconds = self._claim_samples(conn, claim, params)
        print(
            f"[bench]   claim of a batch behind {backlog} tasks: "
            f"median {seconds['median'] * 1000:.3f} ms"
        )
        return {"backlog": backlog, "seconds": seconds}

    def sustained(self) -> dict[str, Any]:
        """Part 4: enqueue (single, bulk), then drain everything with 4 workers."""
        from queue_core import enqueue, enqueue_many

        tasks = self.sizes["sustained_tasks"]
        self._reset_queue()
        singles = self.sizes["single_enqueues"]
        started = time.perf_counter()
        for number in range(singles):
            enqueue(self.conn, f"s{number % 100}", {"n": number})
        single_rate = singles / (time.perf_counter() - started)

        self._reset_queue()
        batch_count = 1000 if tasks >= 100_000 else 10
        chunk = 10_000
        started = time.perf_counter()
        for start in range(0, tasks, chunk):
            size = min(chunk, tasks - start)
            enqueue_many(
                self.conn,
                [
                    (f"b{(start + n) % batch_count}", {"n": start + n})
                    for n in range(size)
                ],
            )
        bulk_rate = tasks / (time.perf_counter() - started)
        self.conn.execute('VACUUM ANALYZE "Tasks"')

        batches = [f"b{n}" for n in range(batch_count)]
        timings = self._processes("project-events", self.urls["queue"], 4, batches)
        self._check_drained("project")
        start = min(t[0] for t in timings)
        events = sorted(event for t in timings for event in t[3])
        first, last = _tenths(start, events, tasks)
        return {
            "tasks": tasks,
            "batches": batch_count,
            "workers": 4,
            "enqueue_single_per_second": single_rate,
            "enqueue_bulk_per_second": bulk_rate,
            "bulk_chunk": chunk,
            "drain_per_second": tasks / (max(t[1] for t in timings) - start),
            "first_tenth_per_second": first,
            "last_tenth_per_second": last,
            "last_over_first": last / first if first else None,
        }

    def idle_tick(self) -> dict[str, Any]:
        """Part 5: the scheduled tick on an empty queue, warm, in a fresh process."""
        self._reset_queue()
        result = _probe("tick", self.urls["queue"], self.sizes["ticks"])
        result["tick_seconds"] = spread(result["tick_seconds"])
        result["query"] = "dispatch_status (sql/queries.sql)"
        plan = self.conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
            + _named("dispatch_status"),
            {"lease_seconds": 300, "limit": 10},
        ).fetchall()
        result["plan"] = [row[0] for row in plan]
        return result

    def cold_start(self) -> dict[str, Any]:
        """Part 6: import time of handler.app; peak memory of a draining invoke."""
        imports = [
            _probe("import", self.urls["queue"])["import_seconds"]
            for _ in range(self.sizes["reps"])
        ]
        self._fill(1, 1000, spread_seconds=1)
        invoke = _probe("invoke", self.urls["queue"])
        return {
            "import_seconds": spread(imports),
            "invoke_peak_rss_mib": invoke["peak_rss_mib"],
            "invoke_completed": invoke["completed"],
            "boto3_imported_after_invoke": invoke["boto3_imported"],
            "botocore_imported_after_invoke": invoke["botocore_imported"],
        }


def _rollback_keeping_prepared(conn: psycopg.Connection) -> None:
    """ROLLBACK under psycopg's eyes: it drops its prepared statements when it runs
    one, and the worker, which never rolls back on its normal path, keeps them."""
    conn.pgconn.exec_(b"ROLLBACK")


def _explained(conn: psycopg.Connection, statement: str, params: dict) -> str:
    """EXPLAIN ANALYZE of one statement, rolled back."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params
        ).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return "\n".join(row[0] for row in rows)


def _in_process(system: str, url: str, batches: list[str], proxy) -> None:
    """Run one drain loop in this process (the proxy counts only its traffic)."""

    class NoBarrier:
        def wait(self) -> None:
            proxy.reset()  # connecting is not part of the per-task cost

    LOOPS[system](url, 0, 1, batches, NoBarrier())


def _tenths(start: float, events: list[tuple[float, int]], tasks: int):
    """Throughput over the first and over the last tenth of the tasks."""
    tenth = tasks / 10
    done = 0
    first_end = last_start = None
    previous_time = start
    for when, count in events:
        before = done
        done += count
        if first_end is None and done >= tenth:
            first_end = when
        if last_start is None and done >= tasks - tenth:
            last_start = previous_time if before < tasks - tenth else when
        previous_time = when
    end = events[-1][0] if events else start
    first = tenth / (first_end - start) if first_end and first_end > start else None
    last = (
        (done - (tasks - tenth)) / (end - last_start)
        if last_start is not None and end > last_start
        else None
    )
    return first, last


def _named(name: str) -> str:
    from queue_core.queries import query

    return query(name)


def _probe(what: str, url: str, count: int = 1) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
            "DATABASE_URL": url,
            "MAX_CONCURRENCY": "10",
            "TASK_PROCESSOR": "queue_core.processor:no_work",
            "POWERTOOLS_TRACE_DISABLED": "1",
        }
        subprocess.run(
            [sys.executable, "-m", "bench.probe", what, result.name, str(count)],
            cwd=REPO_ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=600,
        )
        return __import__("json").loads(Path(result.name).read_text())


def _brief(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{system} {row[system]['median']:.0f}/s" for system in SYSTEMS if system in row
    )
