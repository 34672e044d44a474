"""A worker process that stops at a chosen step and waits there to be killed or frozen.

    python -m tests.support.fault_worker --stop-at POINT [--batch B] [--worker-id W]

POINT is one of:
  after_claim     the claim has committed; the head is not locked yet
  mid_task        the processor has started the head (recorded) and not returned
  after_complete  the head's delete has committed and the next head is locked; the
                  lease is neither released nor used again
  nowhere         run to the end

When it reaches the point the process prints "at POINT" on standard output and waits
for a line on standard input, so that the test can send it a real signal there, and let
it go on afterwards. Settings come from the environment, as for a Lambda worker; tasks
are recorded by tests.support.processors.record. Its report is printed last, as JSON.
"""

import argparse
import json
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from queue_core import ConnectionHolder, Settings, Worker
from tests.support.processors import record

POINTS = ("after_claim", "mid_task", "after_complete", "nowhere")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    connections = ConnectionHolder.for_settings(settings, "fault-worker")

    def stop_here(point: str) -> None:
        if point == args.stop_at:
            print(f"at {point}", flush=True)
            sys.stdin.readline()

    @contextmanager
    def step_span(name: str):
        if name == "lock_head":
            stop_here("after_claim")
        yield
        if name == "complete_task":
            stop_here("after_complete")

    def processor(task):
        record(task)
        stop_here("mid_task")

    worker = Worker(connections, settings, processor, step_span=step_span)
    report = worker.run(args.worker_id or f"fault-{os.getpid()}", args.batch)
    print(json.dumps(report.as_dict()), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stop-at", choices=POINTS, required=True)
    parser.add_argument("--batch", help="the batch to claim first")
    parser.add_argument("--worker-id")
    return parser


if __name__ == "__main__":
    sys.exit(main())


class FaultWorkers:
    """Fault worker processes started by one test; all killed at the end."""

    def __init__(self, directory, db_url: str, records_file, **env: str) -> None:
        self._directory = pathlib.Path(directory)
        repo_root = pathlib.Path(__file__).resolve().parents[2]
        self._cwd = repo_root
        self._environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(repo_root / "src"), str(repo_root)]),
            "DATABASE_URL": db_url,
            "RECORD_FILE": str(records_file),
            "RECORD_SLEEP_SECONDS": "0",
            "TASK_BUDGET_SECONDS": "1",
            "SAFETY_MARGIN_SECONDS": "1",
            **env,
        }
        self._started: list = []

    def start(self, stop_at: str, batch: str | None = None, **env: str):
        number = len(self._started) + 1
        command = [sys.executable, "-m", "tests.support.fault_worker"]
        command += ["--stop-at", stop_at, "--worker-id", f"victim-{number}"]
        if batch:
            command += ["--batch", batch]
        process = subprocess.Popen(
            command,
            cwd=self._cwd,
            env={**self._environment, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self._directory / f"fault-{number}.err", "wb"),  # noqa: SIM115
            text=True,
        )
        process.worker_id = f"victim-{number}"
        process.err_path = self._directory / f"fault-{number}.err"
        self._started.append(process)
        return process

    def wait_at(self, process, point: str, timeout: float = 60) -> None:
        """Block until the process says it reached point; fail if it ends first."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=0.5):
                    line = process.stdout.readline()
                    if line.strip() == f"at {point}":
                        return
                    if not line:
                        break
        raise AssertionError(
            f"{process.worker_id} did not reach {point}:\n"
            + process.err_path.read_text(errors="replace")[-3000:]
        )

    def let_go(self, process, timeout: float = 60) -> dict:
        """Let a stopped process go on; its final report."""
        out, _ = process.communicate("go\n", timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise AssertionError(
                f"{process.worker_id} printed no report:\n"
                + process.err_path.read_text(errors="replace")[-3000:]
            )
        return json.loads(lines[-1])

    def stop_all(self) -> None:
        for process in self._started:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait(timeout=30)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()
