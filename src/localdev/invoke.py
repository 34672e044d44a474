"""Run the Lambda handler once, in this process, on an event file: `make invoke`.

    python -m localdev.invoke events/schedule-default.json [--remaining-seconds 60]

The stand-in for `sam local invoke` where no container engine runs: the database is
DATABASE_URL (the Makefile passes the embedded server's), migrated first; the handler's
structured logs and EMF metrics go to standard error as they happen, and the response
is printed on standard output, as `sam local invoke` does.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# Local runs have no X-Ray daemon to send traces to.
LOCAL_ENVIRONMENT = {
    "POWERTOOLS_TRACE_DISABLED": "1",
    "POWERTOOLS_SERVICE_NAME": "task-queue-local",
}


class LocalContext:
    """The context the Lambda runtime passes, with a real remaining-time clock."""

    function_name = "task-queue-local"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:local:000000000000:function:task-queue-local"
    memory_limit_in_mb = 256
    log_group_name = "/aws/lambda/task-queue-local"
    log_stream_name = "local"

    def __init__(self, remaining_seconds: float) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + remaining_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        event = _read_event(args.event)
    except (OSError, ValueError) as error:
        print(f"error: {args.event}: {error}", file=sys.stderr)
        return 2
    if not os.environ.get("DATABASE_URL", "").strip():
        print("error: DATABASE_URL is not set (make invoke sets it)", file=sys.stderr)
        return 2

    for name, value in LOCAL_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    _migrate(os.environ["DATABASE_URL"])

    with contextlib.redirect_stdout(sys.stderr):
        # Imported here, with standard output redirected: the handler's logger binds
        # its stream when the module loads.
        from handler.app import lambda_handler

        response = lambda_handler(event, LocalContext(args.remaining_seconds))
    json.dump(response, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


def _read_event(path: str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _migrate(url: str) -> None:
    from queue_core import connect, migrate

    with connect(url, connect_timeout=10, application_name="local_invoke") as conn:
        applied = migrate(conn)
    if applied:
        print(f"applied migrations: {', '.join(applied)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localdev.invoke",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("event", help="a JSON event file, such as events/*.json")
    parser.add_argument(
        "--remaining-seconds",
        type=float,
        default=60.0,
        help="the invocation's time budget, as the function timeout gives it",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
