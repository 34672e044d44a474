"""python -m bench [--quick | --tiny] [--database NAME] [--out FILE]

Runs the seven parts on the server of DATABASE_URL (the Makefile passes the embedded
one), each in its own database, and writes a table, a JSON file and a summary line.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import parts
from bench.report import print_table, summary_line

SIZES = {
    # drain_tasks per drain run; claim grid; sustained drain; samples per measure.
    "full": dict(
        drain_tasks=5000,
        claim_batches=(10, 1_000, 100_000),
        claim_tasks=(1_000, 1_000_000),
        claim_samples=300,
        sustained_tasks=1_000_000,
        single_enqueues=2_000,
        ticks=200,
        reps=3,
    ),
    "quick": dict(
        drain_tasks=2000,
        claim_batches=(10, 1_000, 10_000),
        claim_tasks=(1_000, 100_000),
        claim_samples=200,
        sustained_tasks=100_000,
        single_enqueues=1_000,
        ticks=100,
        reps=3,
    ),
    "tiny": dict(
        drain_tasks=60,
        claim_batches=(10, 100),
        claim_tasks=(100, 1_000),
        claim_samples=20,
        sustained_tasks=2_000,
        single_enqueues=50,
        ticks=10,
        reps=1,  # a smoke test that the code still runs, not a measurement
    ),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    if args.sustained_tasks:
        sizes["sustained_tasks"] = args.sustained_tasks
    server_url = os.environ.get("DATABASE_URL", "").strip()
    if not server_url:
        print("DATABASE_URL is not set (make bench sets it)", file=sys.stderr)
        return 2

    bench = parts.Bench(server_url, args.database, sizes, mode, peers=not args.no_peers)
    started = time.perf_counter()
    try:
        results = bench.run_all()
    finally:
        bench.close()
    results["seconds"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print(f"results written to {out}")
    print(summary_line(results))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, minutes")
    parser.add_argument("--tiny", action="store_true", help="seconds: for the tests")
    parser.add_argument("--database", default="queue_bench", help="prefix of its dbs")
    parser.add_argument("--out", default="bench/results/latest.json")
    parser.add_argument("--no-peers", action="store_true", help="skip the libraries")
    parser.add_argument("--sustained-tasks", type=int, default=0, help="override")
    return parser


if __name__ == "__main__":
    sys.exit(main())
