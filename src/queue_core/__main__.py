"""Command line: python -m queue_core {migrate,enqueue,stats,leases,dead,resume,cancel,
policy}. Uses DATABASE_URL and the worker's settings (timeouts, lease, attempts)."""

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import psycopg

from queue_core import operations
from queue_core.config import EXHAUSTION_POLICIES, Settings
from queue_core.db import connect, server_bounds
from queue_core.enqueue import enqueue_many
from queue_core.errors import ConfigurationError, InvalidInput, QueueError
from queue_core.migrations import migrate
from queue_core.queries import query
from queue_core.validation import MAX_PAYLOAD_DEPTH


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    try:
        settings = Settings.from_env()
        with _connect(settings) as conn:
            return args.command(conn, settings, args)
    except (InvalidInput, ConfigurationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except QueueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except psycopg.Error as error:
        # The server's message names no password; the connection string is not shown.
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"error: database: {type(error).__name__}: {detail}", file=sys.stderr)
        return 1


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
    return connect(
        settings.database_url, settings.connect_timeout_seconds, "queue_cli", bounds
    )


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


def _leases(conn, settings: Settings, args) -> int:
    if args.release:
        owner = operations.release_lease(conn, args.release)
        if args.json:
            print(json.dumps({"batchId": args.release, "previousOwner": owner}))
        elif owner is None:
            print(f"batch {args.release} had no owner; nothing to release")
        else:
            print(f"released batch {args.release} from {owner}")
        return 0

    batches = operations.list_batches(conn, settings.lease_seconds, args.batch)
    if args.json:
        print(json.dumps({"batches": [batch.as_dict() for batch in batches]}))
        return 0
    print(f"{'batch':<24} {'pending':>7} {'dead':>5}  {'state':<8} owner / reason")
    for batch in batches:
        if batch.halted_at is not None:
            state, note = "HALTED", (batch.halt_reason or "")[:100]
        elif batch.lease_live:
            state, note = "leased", f"{batch.owner} (token {batch.fencing_token})"
        elif batch.owner is not None:
            state, note = "expired", f"{batch.owner} (token {batch.fencing_token})"
        else:
            state, note = "free", ""
        print(
            f"{batch.batch_id:<24} {batch.pending:>7} {batch.dead_letters:>5}  "
            f"{state:<8} {note}"
        )
    return 0


def _dead(conn, settings: Settings, args) -> int:
    ids = _id_list(args.ids) if args.ids else None
    if args.redrive:
        redriven = operations.redrive_dead_letters(conn, args.batch, ids)
        if args.json:
            print(json.dumps({"redriven": redriven}))
        else:
            total = sum(len(task_ids) for task_ids in redriven.values())
            print(f"redrove {total} dead letter(s)")
            for batch_id, task_ids in redriven.items():
                print(f"  {batch_id}: {_id_ranges(task_ids)}")
        return 0
    if args.purge:
        if args.batch is None and ids is None and not args.all:
            raise InvalidInput("--purge", "needs --batch, --ids or --all")
        purged = operations.purge_dead_letters(conn, args.batch, ids)
        if args.json:
            print(json.dumps({"purged": purged}))
        else:
            print(f"purged {len(purged)} dead letter(s)")
        return 0

    letters = operations.list_dead_letters(conn, args.batch, args.limit)
    if ids is not None:
        letters = [letter for letter in letters if letter.id in set(ids)]
    if args.json:
        print(json.dumps({"deadLetters": [letter.as_dict() for letter in letters]}))
        return 0
    print(f"{'id':>10} {'batch':<24} {'attempts':>8} {'reason':<9}  last error")
    for letter in letters:
        error = (letter.last_error or "").replace("\n", " ")[:60]
        print(
            f"{letter.id:>10} {letter.batch_id:<24} {letter.attempts:>8} "
            f"{letter.reason:<9}  {error}"
        )
    return 0


def _resume(conn, settings: Settings, args) -> int:
    resumed = operations.resume_batch(conn, args.batch_id)
    if args.json:
        print(
            json.dumps(
                {
                    "batchId": resumed.batch_id,
                    "wasHalted": resumed.was_halted,
                    "headId": resumed.head_id,
                    "headHeld": resumed.head_held,
                }
            )
        )
    elif not resumed.was_halted:
        print(f"batch {args.batch_id} was not halted; nothing to do")
    elif resumed.head_held:
        print(
            f"resumed batch {args.batch_id}; its head (task {resumed.head_id}) was "
            "held by another transaction and keeps its attempts: resume again later"
        )
    else:
        print(
            f"resumed batch {args.batch_id}; its head (task {resumed.head_id}) "
            "starts again with a fresh set of attempts"
        )
    return 0


def _cancel(conn, settings: Settings, args) -> int:
    cancelled = operations.cancel_batch(conn, args.batch_id)
    if args.json:
        print(
            json.dumps(
                {
                    "batchId": cancelled.batch_id,
                    "cancelled": cancelled.cancelled,
                    "inFlight": cancelled.in_flight,
                }
            )
        )
    else:
        print(
            f"cancelled {len(cancelled.cancelled)} task(s) of batch {args.batch_id}: "
            "moved to the dead letters (dead --redrive puts them back)"
        )
        if cancelled.in_flight:
            print(f"left in flight: {cancelled.in_flight}")
    return 0


def _policy(conn, settings: Settings, args) -> int:
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
    if args.json:
        print(
            json.dumps(
                {
                    "batchId": args.batch_id,
                    "maxAttempts": max_attempts,
                    "onExhausted": on_exhausted,
                }
            )
        )
    else:
        print(
            f"batch {args.batch_id}: max attempts "
            f"{max_attempts or f'{settings.max_attempts} (deployment)'}, "
            f"when exhausted {on_exhausted or f'{settings.on_exhausted} (deployment)'}"
        )
    return 0


def _tasks_from_args(args) -> Iterator[tuple[str, Any]]:
    if args.file is None:
        if args.batch is None:
            raise InvalidInput("--batch", "is required unless --file is given")
        yield args.batch, _json(args.payload, "--payload")
        return
    stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    with stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"line {number}", "must be valid UTF-8") from None
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
    except RecursionError:
        raise InvalidInput(
            field, f"must nest at most {MAX_PAYLOAD_DEPTH} levels"
        ) from None


def _id_list(text: str) -> list[int]:
    return [_whole_number(part, "--ids") for part in text.split(",") if part.strip()]


def _whole_number(text: str, field: str) -> int:
    if not text.strip().isdigit():
        raise InvalidInput(field, f"must be whole numbers, got {text!r}")
    return int(text)


def _id_ranges(ids: list[int]) -> str:
    return ", ".join(str(task_id) for task_id in ids[:20]) + (
        f" and {len(ids) - 20} more" if len(ids) > 20 else ""
    )


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

    sub = commands.add_parser(
        "leases",
        parents=[common],
        help="batches with their owner, halt and dead letters; --release one",
    )
    sub.add_argument("--batch", help="show only this batch")
    sub.add_argument(
        "--release",
        metavar="BATCH",
        help="take the lease from its owner (its task in flight is redone later)",
    )
    sub.set_defaults(command=_leases)

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
    return parser


if __name__ == "__main__":
    sys.exit(main())
