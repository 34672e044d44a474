"""The named queries of sql/queries.sql, loaded once by name."""

from functools import cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# In the repository sql/ sits beside src/; in the Lambda package, beside queue_core/;
# installed with pip, inside it (queue_core/sql).
_SQL_DIRS = (_HERE.parent / "sql", _HERE.parent.parent / "sql", _HERE / "sql")


@cache
def sql_dir() -> Path:
    for candidate in _SQL_DIRS:
        if (candidate / "queries.sql").is_file():
            return candidate
    raise FileNotFoundError(f"no sql/queries.sql beside {_HERE.parent}")


@cache
def load_named(path: Path) -> dict[str, str]:
    """The queries of a .sql file by name; each starts with a "-- name: <name>" line."""
    named: dict[str, str] = {}
    name = None
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("-- name:"):
            if name:
                named[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = line.removeprefix("-- name:").strip(), []
        elif name and not line.startswith("--"):
            lines.append(line)
    if name:
        named[name] = "\n".join(lines).strip().rstrip(";")
    return named


def query(name: str) -> str:
    """The text of a named query; KeyError names an unknown one."""
    return _queries()[name]


@cache
def _queries() -> dict[str, str]:
    # Looked up on every statement: no path built or hashed per call.
    return load_named(sql_dir() / "queries.sql")
