"""The operator's command line: python -m queue_core (or queue-core) COMMAND.

Commands: migrate; enqueue (one task, or JSON lines from a file or standard input);
stats (per batch); leases (list, release one). The database is DATABASE_URL.

Tables by default; with --json, standard output holds only the JSON document and logs
go to standard error. Exit codes: 0 done, 1 refused or failed (the lease is not held,
the batch does not exist, a database error), 2 bad input or configuration, 3 the
database cannot be reached.
"""

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors

from queue_core import operations
from queue_core.config import Settings
from queue_core.db import connect
from queue_core.enqueue import enqueue_many
from queue_core.errors import ConfigurationError, InvalidInput, QueueError
from queue_core.migrations import migrate

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3

# Tasks per INSERT when enqueueing a file; all of them still commit together.
ENQUEUE_CHUNK = 5000
# The fields of one JSON line given to enqueue --file.
TASK_LINE_FIELDS = ("batchId", "payload")


@dataclass
class Result:
    """What a command prints: a JSON document, or the same as readable text."""

    document: dict[str, Any]
    text: str


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    try:
        settings = Settings.from_env()
        with _connect(settings) as conn:
            result = args.command(conn, settings, args)
    except (InvalidInput, ConfigurationError) as error:
        return _fail(EXIT_BAD_INPUT, str(error))
    except _Unreachable as error:
        return _fail(EXIT_UNREACHABLE, str(error))
    except QueueError as error:
        return _fail(EXIT_REFUSED, str(error))
    except errors.UndefinedTable as error:
        return _fail(
            EXIT_REFUSED,
            f"{_first_line(error)} (has `queue-core migrate` been run?)",
        )
    except psycopg.Error as error:
        return _fail(
            EXIT_REFUSED,
            f"database error: {type(error).__name__}: {_first_line(error)}",
        )

    if args.json:
        json.dump(result.document, sys.stdout, default=_json_value)
        sys.stdout.write("\n")
    else:
        print(result.text)
    return 0


# ----------------------------------------------------------------------- commands


def _migrate(conn: psycopg.Connection, settings: Settings, args) -> Result:
    applied = migrate(conn)
    text = f"applied {len(applied)} migration(s)"
    if applied:
        text += f": {', '.join(applied)}"
    return Result({"applied": applied}, text)


def _enqueue(conn: psycopg.Connection, settings: Settings, args) -> Result:
    tasks = list(_tasks_from_args(args))
    if not tasks:
        raise InvalidInput("--file", "holds no task")
    ids: list[int] = []
    with conn.transaction():
        for start in range(0, len(tasks), ENQUEUE_CHUNK):
            ids += enqueue_many(
                conn,
                tasks[start : start + ENQUEUE_CHUNK],
                max_payload_bytes=settings.max_payload_bytes,
            )
    text = f"enqueued {len(ids)} task(s): ids {ids[0]}..{ids[-1]}"
    return Result({"ids": ids}, text)


def _stats(conn: psycopg.Connection, settings: Settings, args) -> Result:
    batches = operations.batch_stats(conn, settings.lease_seconds, args.batch)
    document = {
        "batches": [
            {
                "batchId": batch.batch_id,
                "pending": batch.pending,
                "oldestPendingSeconds": _seconds(batch.oldest_pending_age),
                "owner": batch.owner,
                "leaseExpiresAt": batch.lease_expires_at,
                "leaseExpired": batch.lease_expired,
                "blocked": batch.blocked,
                "headTaskId": batch.head_id,
                "headAttempts": batch.head_attempts,
                "headLastError": batch.head_last_error,
                "headRetryAt": batch.head_retry_at,
            }
            for batch in batches
        ]
    }
    rows = [
        [
            batch.batch_id,
            batch.pending,
            _age(batch.oldest_pending_age),
            _owner(batch.owner, batch.lease_expired),
            _time(batch.lease_expires_at),
            _blocked(batch),
        ]
        for batch in batches
    ]
    headers = ["BATCH", "PENDING", "OLDEST", "OWNER", "LEASE EXPIRES", "BLOCKED"]
    return Result(document, _table(headers, rows, empty="no batches"))


def _leases_list(conn: psycopg.Connection, settings: Settings, args) -> Result:
    leases = operations.list_leases(conn, settings.lease_seconds, args.all)
    document = {
        "leases": [
            {
                "batchId": lease.batch_id,
                "owner": lease.owner,
                "fencingToken": lease.fencing_token,
                "lockedAt": lease.locked_at,
                "expiresAt": lease.expires_at,
                "expired": lease.expired,
                "pending": lease.pending,
            }
            for lease in leases
        ]
    }
    rows = [
        [
            lease.batch_id,
            _owner(lease.owner, lease.expired),
            lease.fencing_token,
            _time(lease.expires_at),
            lease.pending,
        ]
        for lease in leases
    ]
    headers = ["BATCH", "OWNER", "TOKEN", "EXPIRES", "PENDING"]
    empty = "no leases" if args.all else "no lease is held"
    return Result(document, _table(headers, rows, empty=empty))


def _leases_release(conn: psycopg.Connection, settings: Settings, args) -> Result:
    released = operations.release_lease(conn, args.batch_id, args.owner)
    document = {
        "batchId": released.batch_id,
        "previousOwner": released.previous_owner,
        "fencingToken": released.fencing_token,
    }
    text = (
        f"released the lease of batch {released.batch_id!r} "
        f"(was held by {released.previous_owner!r}; new fencing token "
        f"{released.fencing_token})"
    )
    return Result(document, text)


# ----------------------------------------------------------------------- input


def _tasks_from_args(args) -> Iterator[tuple[str, Any]]:
    if args.file is None:
        if args.batch is None:
            raise InvalidInput("--batch", "is required unless --file is given")
        payload = "{}" if args.payload is None else args.payload
        yield args.batch, _json(payload, "--payload")
        return
    if args.batch is not None or args.payload is not None:
        raise InvalidInput(
            "--file",
            "cannot be combined with --batch or --payload (each line names its batch)",
        )
    for number, line in _lines(args.file):
        field = f"line {number}"
        record = _json(line, field)
        if not isinstance(record, dict) or "batchId" not in record:
            raise InvalidInput(field, 'must be an object with "batchId"')
        unknown = sorted(set(record) - set(TASK_LINE_FIELDS))
        if unknown:
            raise InvalidInput(
                field,
                f"has unknown field(s) {', '.join(unknown)} "
                f"(known: {', '.join(TASK_LINE_FIELDS)})",
            )
        yield record["batchId"], record.get("payload")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as error:
        raise InvalidInput("--file", f"cannot be read ({error.strerror})") from None
    with stream:
        try:
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    yield number, line
        except UnicodeDecodeError:
            raise InvalidInput("--file", "must be UTF-8 text") from None


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput(
            field, f"must be valid JSON ({error.msg} at {error.pos})"
        ) from None


# ----------------------------------------------------------------------- output


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return empty
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in cells
    )


def _blocked(batch: operations.BatchStats) -> str:
    if not batch.blocked:
        return "no"
    text = f"yes: head {batch.head_id} failed {batch.head_attempts}x"
    if batch.head_retry_at is not None:
        text += f", retry at {_time(batch.head_retry_at)}"
    return text


def _owner(owner: str | None, expired: bool) -> str | None:
    if owner is None:
        return None
    return f"{owner} (expired)" if expired else owner


def _age(age: timedelta | None) -> str | None:
    if age is None:
        return None
    seconds = age.total_seconds()
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _seconds(age: timedelta | None) -> float | None:
    return None if age is None else age.total_seconds()


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ----------------------------------------------------------------------- plumbing


class _Unreachable(Exception):
    """The database did not accept a connection."""


def _connect(settings: Settings) -> psycopg.Connection:
    try:
        return connect(
            settings.database_url, settings.connect_timeout_seconds, "queue_cli"
        )
    except psycopg.OperationalError as error:
        # libpq's message names the server, never the password.
        raise _Unreachable(f"database unreachable: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _options(default: Any) -> argparse.ArgumentParser:
    """--json and --verbose, accepted before or after the command.

    The command's copies default to SUPPRESS, so they never undo the same option
    given before the command.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print only a JSON document on standard output",
    )
    options.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log what is done (INFO) on standard error",
    )
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queue-core",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_options(default=False)],
    )
    common = _options(default=argparse.SUPPRESS)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    sub = commands.add_parser(
        "migrate", parents=[common], help="apply the schema migrations"
    )
    sub.set_defaults(command=_migrate)

    sub = commands.add_parser(
        "enqueue", parents=[common], help="append tasks to their batches"
    )
    sub.add_argument("--batch", help="batch id (letters, digits, - _ . :, 1-64 chars)")
    sub.add_argument("--payload", help="task payload as JSON (default {})")
    sub.add_argument(
        "--file",
        help='JSON lines of {"batchId": ..., "payload": ...}; - for standard input; '
        "all or nothing",
    )
    sub.set_defaults(command=_enqueue)

    sub = commands.add_parser(
        "stats",
        parents=[common],
        help="per batch: pending, oldest, owner, lease expiry, blocked",
    )
    sub.add_argument("--batch", help="only this batch")
    sub.set_defaults(command=_stats)

    _add_leases(commands, common)
    return parser


def _add_leases(commands, common: argparse.ArgumentParser) -> None:
    leases = commands.add_parser(
        "leases", parents=[common], help="list leases, or release one"
    )
    leases.add_argument(
        "--all", action="store_true", help="also list batches whose lease is free"
    )
    leases.set_defaults(command=_leases_list)
    actions = leases.add_subparsers(metavar="ACTION")

    sub = actions.add_parser(
        "list", parents=[common], help="held leases (the default action)"
    )
    sub.add_argument(
        "--all",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also list batches whose lease is free",
    )
    sub.set_defaults(command=_leases_list)

    sub = actions.add_parser(
        "release",
        parents=[common],
        help="free a batch's lease now; its owner is fenced off",
    )
    sub.add_argument("batch_id", metavar="BATCH", help="the batch whose lease to free")
    sub.add_argument(
        "--owner", help="release only if this worker still holds the lease"
    )
    sub.set_defaults(command=_leases_release)


if __name__ == "__main__":
    sys.exit(main())
