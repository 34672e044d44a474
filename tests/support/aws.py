"""AWS in tests: moto's in-memory services, with credentials that can reach nothing."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

REGION = "eu-west-1"


@contextmanager
def mocked_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's mock of every AWS service, and Powertools' parameter caches emptied."""
    from aws_lambda_powertools.utilities import parameters
    from moto import mock_aws

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        # Never a developer's own profile or configuration.
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    # Providers cached by Powertools hold boto3 clients: none may outlive the mock.
    parameters.clear_caches()
    with mock_aws():
        yield
    parameters.clear_caches()
