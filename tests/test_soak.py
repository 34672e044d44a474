"""A small soak: 8 workers over 20 batches under kills, freezes and connection kills.

`make soak` runs the long one; this one, a few hundred tasks, runs with the suite.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_soak_loses_nothing_keeps_order_and_one_owner(db_url, tmp_path):
    # GIVEN a fresh database, and 1000 tasks over 20 batches (some failing on purpose)
    # WHEN 8 worker processes work them while they come and faults are injected (15 s)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "localdev.soak",
            "--in-place",
            "--workers",
            "8",
            "--batches",
            "20",
            "--tasks",
            "1000",
            "--lease",
            "3",
            "--seconds",
            "15",
            "--chaos-every",
            "0.2-0.6",
            "--seed",
            "11",
            "--work-dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
            "DATABASE_URL": db_url,
        },
        capture_output=True,
        text=True,
        timeout=180,
    )

    # THEN every check held, as its last line says
    last_line = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert last_line.startswith("SOAK OK: 1000 tasks: ")
    assert " 0 lost, 0 pending; order kept in 20/20 batches;" in last_line
