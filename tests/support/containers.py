"""PostgreSQL in a Docker container (testcontainers): TEST_DATABASE=testcontainers."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

POSTGRES_IMAGE = "postgres:16-alpine"


def docker_unavailable_reason() -> str | None:
    """Why no container can be started here, or None when a Docker engine answers."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as error:
        return f"no Docker engine answers ({type(error).__name__}: {error})"
    return None


@contextmanager
def postgres_container() -> Iterator[str]:
    """The URL of a PostgreSQL server in a new container; skips without Docker."""
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(f"testcontainers needs Docker: {reason}")

    from testcontainers.postgres import PostgresContainer

    with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        yield container.get_connection_url()
