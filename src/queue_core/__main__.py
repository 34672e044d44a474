"""The operator's command line: python -m queue_core (or queue-core) COMMAND.

Commands: migrate; enqueue (one task, or JSON lines from a file or standard input);
stats (per batch); leases (list, release one); dead (list, redrive or purge dead
letters); resume (a halted batch); cancel (a batch: its tasks become dead letters);
policy (a batch's own attempt limit and exhaustion policy). The database is
DATABASE_URL; the worker's settings (timeouts, lease, attempts) apply.

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
from queue_core.config import EXHAUSTION_POLICIES, Settings
from queue_core.db import connect, server_bounds
from queue_core.enqueue import enqueue_many
from queue_core.errors import ConfigurationError, InvalidInput, QueueError
from queue_core.migrations import migrate
from queue_core.validation import parse_json, whole_number

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3

# Tasks per INSERT when enqueueing a file; all of them still commit together.
ENQUEUE_CHUNK = 5000
# The fields of one JSON line given to enqueue --file.
TASK_LINE_FIELDS = ("batchId", "payload")
# Characters of an error or a halt reason shown in a table (JSON has them whole).
TEXT_WIDTH = 100
# Task ids named one by one in text output.
IDS_SHOWN = 20


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
        # The server's message names no password; the connection string is not shown.
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
                "halted": batch.halted,
                "haltedAt": batch.halted_at,
                "haltReason": batch.halt_reason,
                "headTaskId": batch.head_id,
                "headAttempts": batch.head_attempts,
                "headLastError": batch.head_last_error,
                "headRetryAt": batch.head_retry_at,
                "deadLetters": batch.dead_letters,
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
            batch.dead_letters,
            _blocked(batch),
        ]
        for batch in batches
    ]
    headers = [
        "BATCH",
        "PENDING",
        "OLDEST",
        "OWNER",
        "LEASE EXPIRES",
        "DEAD",
        "BLOCKED",
    ]
    return Result(document, _table(headers, rows, empty="no batches"))


def _leases_list(conn: psycopg.Connection, settings: Settings, args) -> Result:
    leases = operations.list_leases(conn, settings.lease_seconds, args.all, args.batch)
    lease_time = timedelta(seconds=settings.lease_seconds)
    document = {
        "leases": [
            {
                "batchId": lease.batch_id,
                "owner": lease.owner,
                "fencingToken": lease.fencing_token,
                # When the owner took or last renewed it (the expiry is a lease later).
                "lockedAt": (
                    None
                    if lease.lease_expires_at is None
                    else lease.lease_expires_at - lease_time
                ),
                "expiresAt": lease.lease_expires_at,
                "expired": lease.expired,
                "pending": lease.pending,
                "maxAttempts": lease.max_attempts,
                "onExhausted": lease.on_exhausted,
                "halted": lease.halted_at is not None,
                "haltedAt": lease.halted_at,
                "haltReason": lease.halt_reason,
                "headTaskId": lease.head_id,
                "headAttempts": lease.head_attempts,
                "headLastError": lease.head_last_error,
                "deadLetters": lease.dead_letters,
            }
            for lease in leases
        ]
    }
    rows = [
        [
            lease.batch_id,
            _owner(lease.owner, lease.expired),
            lease.fencing_token,
            _time(lease.lease_expires_at),
            lease.pending,
            lease.head_attempts,
            lease.dead_letters,
            "no" if lease.halted_at is None else f"yes: {_short(lease.halt_reason)}",
        ]
        for lease in leases
    ]
    headers = [
        "BATCH",
        "OWNER",
        "TOKEN",
        "EXPIRES",
        "PENDING",
        "HEAD ATTEMPTS",
        "DEAD",
        "HALTED",
    ]
    empty = "no leases" if args.all else "no lease is held"
    return Result(document, _table(headers, rows, empty=empty))


def _leases_release(conn: psycopg.Connection, settings: Settings, args) -> Result:
    released = operations.release_lease(conn, args.batch_id, args.owner)
    if released is None:
        raise operations.LeaseNotHeld(
            f"the lease of batch {args.batch_id!r} is not held"
        )
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


def _dead(conn: psycopg.Connection, settings: Settings, args) -> Result:
    ids = _id_list(args.ids) if args.ids else None
    if args.redrive:
        return _dead_redrive(conn, args.batch, ids)
    if args.purge:
        if args.batch is None and ids is None and not args.all:
            raise InvalidInput("--purge", "needs --batch, --ids or --all")
        purged = operations.purge_dead_letters(conn, args.batch, ids)
        return Result({"purged": purged}, f"purged {len(purged)} dead letter(s)")

    if args.limit < 1:
        raise InvalidInput("--limit", "must be at least 1")
    letters = operations.list_dead_letters(conn, args.batch, args.limit)
    if ids is not None:
        letters = [letter for letter in letters if letter.id in set(ids)]
    document = {
        "deadLetters": [
            {
                "id": letter.id,
                "batchId": letter.batch_id,
                "payload": letter.payload,
                "enqueuedAt": letter.enqueued_at,
                "attempts": letter.attempts,
                "lastError": letter.last_error,
                "firstFailedAt": letter.first_failed_at,
                "lastFailedAt": letter.last_failed_at,
                "deadLetteredAt": letter.dead_lettered_at,
                "reason": letter.reason,
            }
            for letter in letters
        ]
    }
    rows = [
        [
            letter.id,
            letter.batch_id,
            letter.attempts,
            letter.reason,
            _time(letter.dead_lettered_at),
            _short(letter.last_error),
        ]
        for letter in letters
    ]
    headers = ["ID", "BATCH", "ATTEMPTS", "REASON", "DEAD SINCE", "LAST ERROR"]
    return Result(document, _table(headers, rows, empty="no dead letters"))


def _dead_redrive(
    conn: psycopg.Connection, batch_id: str | None, ids: list[int] | None
) -> Result:
    redriven = operations.redrive_dead_letters(conn, batch_id, ids)
    total = sum(len(task_ids) for task_ids in redriven.values())
    lines = [f"redrove {total} dead letter(s)"]
    lines += [
        f"  {batch}: {_id_ranges(task_ids)}" for batch, task_ids in redriven.items()
    ]
    return Result({"redriven": redriven}, "\n".join(lines))


def _resume(conn: psycopg.Connection, settings: Settings, args) -> Result:
    resumed = operations.resume_batch(conn, args.batch_id)
    document = {
        "batchId": resumed.batch_id,
        "wasHalted": resumed.was_halted,
        "headId": resumed.head_id,
        "headHeld": resumed.head_held,
    }
    if not resumed.was_halted:
        text = f"batch {args.batch_id} was not halted; nothing to do"
    elif resumed.head_held:
        text = (
            f"resumed batch {args.batch_id}; its head (task {resumed.head_id}) was "
            "held by another transaction and keeps its attempts: resume again later"
        )
    else:
        text = (
            f"resumed batch {args.batch_id}; its head (task {resumed.head_id}) "
            "starts again with a fresh set of attempts"
        )
    return Result(document, text)


def _cancel(conn: psycopg.Connection, settings: Settings, args) -> Result:
    cancelled = operations.cancel_batch(conn, args.batch_id)
    document = {
        "batchId": cancelled.batch_id,
        "cancelled": cancelled.cancelled,
        "inFlight": cancelled.in_flight,
    }
    text = (
        f"cancelled {len(cancelled.cancelled)} task(s) of batch {args.batch_id}: "
        "moved to the dead letters (dead --redrive puts them back)"
    )
    if cancelled.in_flight:
        text += f"\nleft in flight: {_id_ranges(cancelled.in_flight)}"
    return Result(document, text)


def _policy(conn: psycopg.Connection, settings: Settings, args) -> Result:
    changes = {}
    if args.max_attempts is not None:
        changes["max_attempts"] = (
            None
            if args.max_attempts == "default"
            else _whole_number(args.max_attempts, "--max-attempts")
        )
    if args.on_exhausted is not None:
        changes["on_exhausted"] = (
            None if args.on_exhausted == "default" else args.on_exhausted
        )
    max_attempts, on_exhausted = operations.set_batch_policy(
        conn, args.batch_id, **changes
    )
    document = {
        "batchId": args.batch_id,
        "maxAttempts": max_attempts,
        "onExhausted": on_exhausted,
    }
    text = (
        f"batch {args.batch_id}: max attempts "
        f"{max_attempts or f'{settings.max_attempts} (deployment)'}, "
        f"when exhausted {on_exhausted or f'{settings.on_exhausted} (deployment)'}"
    )
    return Result(document, text)


# ----------------------------------------------------------------------- input


def _tasks_from_args(args) -> Iterator[tuple[str, Any]]:
    if args.file is None:
        if args.batch is None:
            raise InvalidInput("--batch", "is required unless --file is given")
        payload = "{}" if args.payload is None else args.payload
        yield args.batch, parse_json(payload, "--payload")
        return
    if args.batch is not None or args.payload is not None:
        raise InvalidInput(
            "--file",
            "cannot be combined with --batch or --payload (each line names its batch)",
        )
    for number, line in _lines(args.file):
        field = f"line {number}"
        record = parse_json(line, field)
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
    """The file's non-blank lines, each decoded alone: an error names its line."""
    try:
        stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as error:
        raise InvalidInput("--file", f"cannot be read ({error.strerror})") from None
    with stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"line {number}", "must be valid UTF-8") from None
            if line.strip():
                yield number, line


def _id_list(text: str) -> list[int]:
    return [_whole_number(part, "--ids") for part in text.split(",") if part.strip()]


def _whole_number(text: str, field: str) -> int:
    value = whole_number(text.strip())
    if value is None:
        raise InvalidInput(field, f"must be whole numbers, got {text!r}")
    return value


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
    if batch.halted:
        return f"yes: halted: {_short(batch.halt_reason)}"
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


def _short(text: str | None) -> str | None:
    """One line of at most TEXT_WIDTH characters."""
    if text is None:
        return None
    line = " ".join(text.split())
    return line if len(line) <= TEXT_WIDTH else line[: TEXT_WIDTH - 3] + "..."


def _id_ranges(ids: list[int]) -> str:
    return ", ".join(str(task_id) for task_id in ids[:IDS_SHOWN]) + (
        f" and {len(ids) - IDS_SHOWN} more" if len(ids) > IDS_SHOWN else ""
    )


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
    """A connection bounded like a worker's (lock and statement timeouts).

    Without transaction_timeout: a server older than PostgreSQL 17 would refuse it, and
    the commands' transactions are short.
    """
    bounds = (
        server_bounds(settings, transaction_timeout=False)
        if settings.session_options
        else None
    )
    try:
        return connect(
            settings.database_url, settings.connect_timeout_seconds, "queue_cli", bounds
        )
    except psycopg.OperationalError as error:
        # libpq's message names the server, never the password.
        raise _Unreachable(f"database unreachable: {_first_line(error)}") from None
    except psycopg.ProgrammingError as error:
        # libpq could not parse the connection string: a configuration error.
        raise ConfigurationError(
            f"DATABASE_URL is malformed: {_first_line(error)}"
        ) from None


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
        help="per batch: pending, oldest, owner, lease expiry, dead letters, blocked",
    )
    sub.add_argument("--batch", help="only this batch")
    sub.set_defaults(command=_stats)

    _add_leases(commands, common)
    _add_batch_actions(commands, common)
    return parser


def _add_leases(commands, common: argparse.ArgumentParser) -> None:
    leases = commands.add_parser(
        "leases", parents=[common], help="list leases, or release one"
    )
    leases.add_argument(
        "--all", action="store_true", help="also list batches whose lease is free"
    )
    leases.add_argument("--batch", help="only this batch, its lease held or not")
    leases.set_defaults(command=_leases_list)
    actions = leases.add_subparsers(metavar="ACTION")

    sub = actions.add_parser(
        "list",
        parents=[common],
        help="held leases, with their halt and dead letters (the default action)",
    )
    sub.add_argument(
        "--all",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also list batches whose lease is free",
    )
    sub.add_argument(
        "--batch",
        default=argparse.SUPPRESS,
        help="only this batch, its lease held or not",
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


def _add_batch_actions(commands, common: argparse.ArgumentParser) -> None:
    sub = commands.add_parser(
        "dead", parents=[common], help="list, redrive or purge dead letters"
    )
    sub.add_argument("--batch", help="only the dead letters of this batch")
    sub.add_argument("--ids", help="only these task ids, comma-separated")
    sub.add_argument("--limit", type=int, default=1000, help="list at most this many")
    action = sub.add_mutually_exclusive_group()
    action.add_argument(
        "--redrive",
        action="store_true",
        help="put them back in their batches, in their original places",
    )
    action.add_argument("--purge", action="store_true", help="delete them for good")
    sub.add_argument(
        "--all", action="store_true", help="with --purge: every dead letter"
    )
    sub.set_defaults(command=_dead)

    sub = commands.add_parser(
        "resume", parents=[common], help="lift a batch's halt (its head starts afresh)"
    )
    sub.add_argument("batch_id", metavar="BATCH")
    sub.set_defaults(command=_resume)

    sub = commands.add_parser(
        "cancel",
        parents=[common],
        help="move a batch's pending tasks to the dead letters",
    )
    sub.add_argument("batch_id", metavar="BATCH")
    sub.set_defaults(command=_cancel)

    sub = commands.add_parser(
        "policy",
        parents=[common],
        help="set a batch's own attempt limit and exhaustion policy",
    )
    sub.add_argument("batch_id", metavar="BATCH")
    sub.add_argument(
        "--max-attempts", metavar="N", help="1-1000, or 'default' for MAX_ATTEMPTS"
    )
    sub.add_argument(
        "--on-exhausted",
        choices=[*EXHAUSTION_POLICIES, "default"],
        help="what to do with a task whose attempts are used up",
    )
    sub.set_defaults(command=_policy)


if __name__ == "__main__":
    sys.exit(main())
