"""The benchmark's tiny mode runs end to end, so that `make bench` cannot rot.

It prints figures only; nothing here judges speed.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_tiny_benchmark_runs_every_part_and_writes_its_results(postgres_url, tmp_path):
    # GIVEN the test server and a results file of this test's own
    out = tmp_path / "latest.json"
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
        "DATABASE_URL": postgres_url,
    }

    # WHEN the tiny benchmark runs, without the peer libraries
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--tiny", "--no-peers"),
            *("--database", f"queue_bench_test_{os.getpid()}", "--out", str(out)),
        ],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        timeout=300,
    )

    # THEN it wrote every part and ended with its one-line summary
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    results = json.loads(out.read_text())
    for part in (
        "drain",
        "round_trips",
        "claim_latency",
        "sustained",
        "idle_tick",
        "cold_start",
        "cost",
    ):
        assert part in results, part
    assert {"raw", "project", "project-audit"} <= set(results["drain"]["runs"][0])
    assert results["idle_tick"]["boto3_imported"] is False
    assert done.stdout.decode().strip().splitlines()[-1].startswith("bench tiny:")
