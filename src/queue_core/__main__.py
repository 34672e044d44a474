"""Command line: python -m queue_core {migrate,enqueue,stats}. Uses DATABASE_URL."""

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import psycopg

from queue_core.config import Settings
from queue_core.db import connect
from queue_core.enqueue import enqueue_many
from queue_core.errors import ConfigurationError, InvalidInput, QueueError
from queue_core.migrations import migrate
from queue_core.queries import query


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    try:
        settings = Settings.from_env()
        with connect(
            settings.database_url, settings.connect_timeout_seconds, "queue_cli"
        ) as conn:
            return args.command(conn, settings, args)
    except (InvalidInput, ConfigurationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except QueueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as error:
        # libpq's message names host and port, never the password.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"error: cannot reach the database: {reason}", file=sys.stderr)
        return 1


def _migrate(conn, settings: Settings, args) -> int:
    applied = migrate(conn)
    if args.json:
        print(json.dumps({"applied": applied}))
    else:
        print(
            f"applied {len(applied)} migration(s)"
            + (f": {', '.join(applied)}" if applied else "")
        )
    return 0


def _enqueue(conn, settings: Settings, args) -> int:
    tasks = list(_tasks_from_args(args))
    ids = enqueue_many(conn, tasks, max_payload_bytes=settings.max_payload_bytes)
    if args.json:
        print(json.dumps({"ids": ids}))
    else:
        print(f"enqueued {len(ids)} task(s): ids {ids[0]}..{ids[-1]}")
    return 0


def _stats(conn, settings: Settings, args) -> int:
    rows = conn.execute(query("batch_stats"), {"lease_seconds": settings.lease_seconds})
    batches = [
        {
            "batchId": batch_id,
            "pending": pending,
            "oldestPendingSeconds": age.total_seconds() if age is not None else None,
            "owner": owner,
            "leaseExpiresAt": expires.isoformat() if expires else None,
        }
        for batch_id, pending, age, owner, expires in rows
    ]
    if args.json:
        print(json.dumps({"batches": batches}))
        return 0
    print(f"{'batch':<24} {'pending':>8} {'oldest(s)':>10}  owner")
    for batch in batches:
        oldest = batch["oldestPendingSeconds"]
        print(
            f"{batch['batchId']:<24} {batch['pending']:>8} "
            f"{'' if oldest is None else f'{oldest:.1f}':>10}  {batch['owner'] or '-'}"
        )
    return 0


def _tasks_from_args(args) -> Iterator[tuple[str, Any]]:
    if args.file is None:
        if args.batch is None:
            raise InvalidInput("--batch", "is required unless --file is given")
        yield args.batch, _json(args.payload, "--payload")
        return
    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            record = _json(line, f"line {number}")
            if not isinstance(record, dict) or "batchId" not in record:
                raise InvalidInput(f"line {number}", 'must be an object with "batchId"')
            yield record["batchId"], record.get("payload")


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput(
            field, f"must be valid JSON ({error.msg} at {error.pos})"
        ) from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print JSON on standard output"
    )
    parser = argparse.ArgumentParser(prog="queue_core", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="command")

    sub = commands.add_parser(
        "migrate", parents=[common], help="apply the schema migrations"
    )
    sub.set_defaults(command=_migrate)

    sub = commands.add_parser(
        "enqueue", parents=[common], help="append tasks to a batch"
    )
    sub.add_argument("--batch", help="batch id (letters, digits, - _ . :, 1-64 chars)")
    sub.add_argument("--payload", default="{}", help="task payload as JSON")
    sub.add_argument(
        "--file", help="JSON lines of {batchId, payload}; - for standard input"
    )
    sub.set_defaults(command=_enqueue)

    sub = commands.add_parser(
        "stats", parents=[common], help="pending tasks and leases per batch"
    )
    sub.set_defaults(command=_stats)
    return parser


if __name__ == "__main__":
    sys.exit(main())
