"""Measurements that need a fresh interpreter, as a cold Lambda environment has:

    python -m bench.probe import|tick|invoke RESULT_FILE [TICKS_OR_TASKS]

import: seconds to import handler.app. tick: the idle scheduled tick, warm, timed, and
its statements and round trips counted through the proxy; whether boto3 got imported.
invoke: a direct invoke that drains the queue; the process's peak memory after it.
The handler's logs and metrics go to standard output; the result goes to the file.
"""

import json
import os
import resource
import sys
import time


def main(argv: list[str]) -> int:
    what, result_file = argv[0], argv[1]
    count = int(argv[2]) if len(argv) > 2 else 1
    os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

    started = time.perf_counter()
    import handler.app as app

    result: dict[str, object] = {"import_seconds": time.perf_counter() - started}
    from tests.support.events import load_event
    from tests.support.lambda_context import LambdaContext

    if what == "tick":
        result.update(_ticks(app, load_event, LambdaContext, count))
    elif what == "invoke":
        response = app.lambda_handler({"workerId": "bench-probe"}, LambdaContext(900))
        result["completed"] = len(response["completed"])
        result["peak_rss_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    result["boto3_imported"] = "boto3" in sys.modules
    result["botocore_imported"] = "botocore" in sys.modules
    with open(result_file, "w") as out:
        json.dump(result, out)
    return 0


def _ticks(app, load_event, context_class, ticks: int) -> dict[str, object]:
    from bench.proxy import CountingProxy

    proxy = CountingProxy(upstream(os.environ["DATABASE_URL"]))
    os.environ["DATABASE_URL"] = through(os.environ["DATABASE_URL"], proxy)
    app._connections, app._settings = None, None
    event = load_event("schedule-default")
    first = app.lambda_handler(event, context_class())  # connects: not counted
    assert first["outcome"] == "no_work", first
    proxy.reset()
    times = []
    for _ in range(ticks):
        started = time.perf_counter()
        app.lambda_handler(event, context_class())
        times.append(time.perf_counter() - started)
    counts = proxy.reset()
    proxy.close()
    return {
        "tick_seconds": times,
        "statements_per_tick": counts.statements / ticks,
        "round_trips_per_tick": counts.round_trips / ticks,
    }


def upstream(url: str):
    import socket

    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    host, port = params.get("host") or "/tmp", params.get("port") or "5432"
    if host.startswith("/"):
        return socket.AF_UNIX, os.path.join(host, f".s.PGSQL.{port}")
    if host not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError("the counting proxy only fronts a server on this machine")
    return socket.AF_INET, (host, int(port))


def through(url: str, proxy) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        url, host=proxy.socket_dir, port="5432", sslmode="disable", gssencmode="disable"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
