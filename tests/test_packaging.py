"""`pip install .` gives a working queue-core command: the SQL travels inside the
package (queue_core/sql), so the installed command needs no checkout."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from queue_core.migrations import migration_files

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_installed_console_command_migrates_and_reports(tmp_path, empty_db_url):
    # GIVEN a wheel built from the repository's tracked files
    source = tmp_path / "source"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, files.split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO_ROOT / name).read_bytes())
    readme = source / "README.md"
    if not readme.exists():
        readme.write_text("# lambda-pg-batch-queue\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (source / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "queue_core/sql/queries.sql" in names
    for path in migration_files():
        assert f"queue_core/sql/migrations/{path.name}" in names
    assert not [name for name in names if name.startswith("localdev/")]

    # AND installed away from the repository
    site = tmp_path / "site"
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr

    # WHEN the queue-core command migrates a database
    environment = {
        key: value for key, value in os.environ.items() if key != "PYTHONPATH"
    }
    result = subprocess.run(
        [str(site / "bin" / "queue-core"), "migrate", "--json"],
        cwd=tmp_path,
        env={**environment, "PYTHONPATH": str(site), "DATABASE_URL": empty_db_url},
        capture_output=True,
        text=True,
        timeout=120,
    )

    # THEN it found the SQL inside the installed package
    assert result.returncode == 0, result.stderr
    versions = [path.stem for path in migration_files()]
    assert json.loads(result.stdout)["applied"] == versions
