"""Part 7: a cost model from the measured figures, with its assumptions printed."""

import math
from typing import Any

ASSUMPTIONS = {
    "lambda_arm64_usd_per_gb_second": 0.0000133334,
    "lambda_usd_per_million_requests": 0.20,
    "memory_mb": 256,
    "ticks_per_month": 43_200,  # one a minute, 30 days
    "worker_seconds_per_invocation": 55,  # a 60 s timeout less the safety margin
    "sqs_fifo_usd_per_million_requests": 0.50,
    "sqs_send_per_message": 1,  # SendMessage; SendMessageBatch would cut it to 0.1
    "sqs_receive_batch": 10,  # Lambda's FIFO event source: up to 10 per receive
    "sqs_delete_batch": 10,  # DeleteMessageBatch: up to 10
    "sqs_lambda_billed_ms_per_invocation": 10,  # 10 zero-work messages, assumed
    "prices": "list prices assumed (us-east-1, no free tier); check before use",
    "excluded": "the PostgreSQL server (needed by the project, not by SQS), data "
    "transfer, CloudWatch logs and metrics",
}


def cost_model(results: dict[str, Any]) -> dict[str, Any]:
    a = ASSUMPTIONS
    gb = a["memory_mb"] / 1024
    per_gb_s = a["lambda_arm64_usd_per_gb_second"]
    per_request = a["lambda_usd_per_million_requests"] / 1e6

    tick = results.get("idle_tick", {}).get("tick_seconds", {}).get("median", 0.001)
    billed_tick = math.ceil(tick * 1000) / 1000  # billed by the millisecond
    idle_month = a["ticks_per_month"] * (per_request + gb * billed_tick * per_gb_s)

    rate = _single_worker_rate(results)
    worker_seconds = 1e6 / rate if rate else float("nan")
    invocations = math.ceil(1e6 / (rate * a["worker_seconds_per_invocation"]))
    project_per_million = worker_seconds * gb * per_gb_s + invocations * per_request

    sqs_requests = 1e6 * (
        a["sqs_send_per_message"]
        + 1 / a["sqs_receive_batch"]
        + 1 / a["sqs_delete_batch"]
    )
    sqs_invocations = 1e6 / a["sqs_receive_batch"]
    sqs_per_million = (
        sqs_requests * a["sqs_fifo_usd_per_million_requests"] / 1e6
        + sqs_invocations * per_request
        + sqs_invocations
        * a["sqs_lambda_billed_ms_per_invocation"]
        / 1000
        * gb
        * per_gb_s
    )
    return {
        "assumptions": a,
        "measured_tick_seconds": tick,
        "project_idle_usd_per_month": idle_month,
        "project_tasks_per_second_one_worker": rate,
        "project_usd_per_million_tasks": project_per_million,
        "sqs_fifo_lambda_requests_per_million_tasks": sqs_requests,
        "sqs_fifo_lambda_usd_per_million_tasks": sqs_per_million,
    }


def _single_worker_rate(results: dict[str, Any]) -> float:
    for row in results.get("drain", {}).get("runs", []):
        if row["workers"] == 1 and "project" in row:
            return row["project"]["median"]
    return 0.0
