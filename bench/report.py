"""The printed table and the one-line summary."""

from typing import Any

OURS = ["raw", "project", "project-audit"]
PEERS = ["pgqueuer", "procrastinate", "procrastinate-lock"]
SYSTEMS = OURS + PEERS


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print()
    print(
        f"mode {r['mode']} | {m['nproc']} cores, {m['memory']}, PostgreSQL "
        f"{m['postgresql']}, Python {m['python']} | {r.get('seconds', '?')} s"
    )
    drain = r["drain"]
    print(f"\n1. drain, tasks/s over {drain['tasks']} tasks: median [min-max] x raw")
    for row in drain["runs"]:
        cells = []
        for system in SYSTEMS:
            if system in row:
                s = row[system]
                cells.append(
                    f"{system} {s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}] "
                    f"{s['ratio_to_raw']:.2f}x"
                )
        print(f"   {row['workers']}w {row['batches']:>3}b: " + " | ".join(cells))
    for system, why in drain["skipped"].items():
        print(f"   {system}: not run ({why})")

    rt = r["round_trips"]
    print(f"\n2. round trips per task ({rt['tasks']} tasks, {rt['batches']} batches)")
    for system in ("project", "raw"):
        print(
            f"   {system}: {rt[system]['round_trips_per_task']:.3f} round trips, "
            f"{rt[system]['statements_per_task']:.3f} statements"
        )
    sel = rt["select_1_seconds"]
    print(
        f"   SELECT 1: median {sel['median'] * 1e3:.3f} ms, p99 {sel['p99'] * 1e3:.3f}"
    )

    claim = r["claim_latency"]
    print("\n3. claim latency (one claim statement), ms: prepared | unprepared")
    for case in claim["cases"]:
        s, u = case["seconds"], case["unprepared_seconds"]
        print(
            f"   {case['batches']:>7} batches {case['tasks']:>9} tasks: median "
            f"{s['median'] * 1e3:.3f} p99 {s.get('p99', s['max']) * 1e3:.3f} | "
            f"median {u['median'] * 1e3:.3f} p99 {u.get('p99', u['max']) * 1e3:.3f}"
        )
    print(f"   largest/smallest median: {claim['largest_over_smallest']:.2f}")
    execution = [
        line for line in claim["plan_of_largest"].splitlines() if "Execution" in line
    ]
    print(f"   plan of the largest case in the JSON file ({''.join(execution)})")
    late = claim["late_batch"]
    print(
        f"   a batch behind {late['backlog']} tasks of 10 others: median "
        f"{late['seconds']['median'] * 1e3:.3f} ms"
    )

    sus = r["sustained"]
    print(f"\n4. sustained: {sus['tasks']} tasks, {sus['batches']} batches, 4 workers")
    print(
        f"   enqueue single {sus['enqueue_single_per_second']:.0f}/s, bulk "
        f"{sus['enqueue_bulk_per_second']:.0f}/s ({sus['bulk_chunk']} per call); "
        f"drain {sus['drain_per_second']:.0f}/s"
    )
    print(
        f"   first tenth {_num(sus['first_tenth_per_second'])}/s, last tenth "
        f"{_num(sus['last_tenth_per_second'])}/s, "
        f"ratio {_num(sus['last_over_first'], 2)}"
    )

    tick = r["idle_tick"]
    t = tick["tick_seconds"]
    print("\n5. idle tick (warm)")
    print(
        f"   {t['median'] * 1e3:.3f} ms median "
        f"(p99 {t.get('p99', t['max']) * 1e3:.3f}),"
        f" {tick['statements_per_tick']:.2f} statements, "
        f"{tick['round_trips_per_tick']:.2f} round trips, boto3 imported: "
        f"{tick['boto3_imported']}"
    )

    cold = r["cold_start"]
    print("\n6. cold start")
    print(
        f"   import handler.app {cold['import_seconds']['median'] * 1e3:.0f} ms; "
        f"invoke of {cold['invoke_completed']} tasks peak RSS "
        f"{cold['invoke_peak_rss_mib']:.0f} MiB; boto3 imported: "
        f"{cold['boto3_imported_after_invoke']}"
    )

    cost = r["cost"]
    print("\n7. cost model (assumptions in the JSON file)")
    print(
        f"   idle: ${cost['project_idle_usd_per_month']:.4f}/month; per million "
        f"tasks: project ${cost['project_usd_per_million_tasks']:.4f} vs SQS FIFO + "
        f"Lambda ${cost['sqs_fifo_lambda_usd_per_million_tasks']:.4f}"
    )
    print()


def summary_line(r: dict[str, Any]) -> str:
    best = next(
        (
            row
            for row in r["drain"]["runs"]
            if row["workers"] == 4 and row["batches"] == 100
        ),
        r["drain"]["runs"][-1],
    )
    peers = ", ".join(
        f"{system} {best['project']['median'] / best[system]['median']:.2f}x"
        for system in PEERS
        if system in best
    )
    return (
        f"bench {r['mode']}: project {best['project']['median']:.0f} tasks/s "
        f"at 4 workers/100 batches = {best['project']['ratio_to_raw']:.2f}x raw"
        + (f", ahead of peers by {peers}" if peers else ", peers not run")
        + f"; {r['round_trips']['project']['round_trips_per_task']:.2f} round trips"
        "/task"
        f"; claim largest/smallest {r['claim_latency']['largest_over_smallest']:.2f}x"
        f"; sustained last/first {_num(r['sustained']['last_over_first'], 2)}"
        f"; idle tick {r['idle_tick']['statements_per_tick']:.0f} query"
        f"; idle ${r['cost']['project_idle_usd_per_month']:.3f}/month"
    )


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
