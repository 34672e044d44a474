"""A worker process for tests: calls handler.app.lambda_handler in a loop, like Lambda.

    python -m tests.support.lambda_worker --reports FILE [--events a,b] [--until-empty]

Settings come from the environment, exactly as in Lambda. Each invocation gets a fresh
context with a unique aws_request_id and a remaining time drawn from
--remaining-seconds; its report is appended as one JSON line to --reports. With
--wait-for-go the process prints "ready" and waits for a line on standard input, so
that many start at once.
"""

import argparse
import json
import os
import random
import sys
import time

import psycopg

from tests.support.events import load_event, report_of, with_unique_ids
from tests.support.lambda_context import LambdaContext


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    chooser = random.Random(args.seed)
    low, _, high = args.remaining_seconds.partition("-")
    remaining = (float(low), float(high or low))

    # Imported here so that the environment is complete before the module reads it.
    from handler.app import lambda_handler

    if args.wait_for_go:
        print("ready", flush=True)
        sys.stdin.readline()

    deadline = time.monotonic() + args.deadline_seconds
    names = args.events.split(",")
    # Never prepared: DATABASE_URL may lead through a transaction pooler (PgBouncer),
    # where a statement prepared on one server session is unknown to the next.
    with psycopg.connect(
        os.environ["DATABASE_URL"], autocommit=True, prepare_threshold=None
    ) as observer:
        invocations = args.invocations or (10**9 if args.until_empty else 1)
        for number in range(invocations):
            if time.monotonic() > deadline:
                print("deadline passed with tasks left", file=sys.stderr)
                return 3
            name = names[number % len(names)]
            context = LambdaContext(chooser.uniform(*remaining))
            response = lambda_handler(with_unique_ids(load_event(name)), context)
            report = report_of(response)
            _append(args.reports, {"pid": os.getpid(), "event": name, **report})

            if not args.until_empty:
                continue
            if not observer.execute('SELECT EXISTS (SELECT FROM "Tasks")').fetchone()[
                0
            ]:
                return 0
            # As between real invocations: others get a chance at a batch just released.
            time.sleep(chooser.uniform(0.005, 0.03))
    return 0


def _append(path: str, line: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", required=True, help="file for the JSON reports")
    parser.add_argument("--events", default="schedule-default", help="names, cycled")
    parser.add_argument(
        "--invocations", type=int, default=None, help="default 1, or no limit"
    )
    parser.add_argument("--until-empty", action="store_true")
    parser.add_argument("--remaining-seconds", default="60")
    parser.add_argument("--deadline-seconds", type=float, default=60.0)
    parser.add_argument("--wait-for-go", action="store_true")
    parser.add_argument("--seed", type=int, default=None)
    return parser


if __name__ == "__main__":
    sys.exit(main())
