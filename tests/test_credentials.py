"""Where the handler's connection string comes from: DATABASE_URL, a Secrets Manager
secret (cached while warm, fetched anew after a refused connection), or a fresh RDS IAM
token per connection. AWS is moto; the database is real."""

import json
from urllib.parse import parse_qs, unquote

import boto3
import pytest
from psycopg.conninfo import conninfo_to_dict

from handler.credentials import (
    CredentialsUnavailable,
    DatabaseUrl,
    IamAuthToken,
    SecretsManagerCredentials,
    conninfo_provider,
)
from queue_core import ConfigurationError, ConnectionHolder, enqueue_many
from tests.support import db
from tests.support.aws import REGION, mocked_aws
from tests.support.events import load_event, with_unique_ids
from tests.support.lambda_context import LambdaContext
from tests.support.logs import captured_handler_log

PASSWORD = "pw-that-must-never-be-logged-7f3a"


@pytest.fixture
def aws(monkeypatch):
    with mocked_aws(monkeypatch):
        yield


@pytest.fixture
def handler_log():
    with captured_handler_log() as log:
        yield log


def rds_secret(db_url: str, **changes) -> str:
    """The secret RDS itself stores for a database: JSON of the test database's
    conninfo (trust authentication ignores the password)."""
    params = conninfo_to_dict(db_url)
    secret = {
        "engine": "postgres",
        "username": params.get("user", "postgres"),
        "password": PASSWORD,
        "host": params["host"],
        "port": int(params.get("port", 5432)),
        "dbname": params["dbname"],
        **changes,
    }
    return json.dumps(secret)


@pytest.fixture
def secrets(aws):
    return boto3.client("secretsmanager", region_name=REGION)


@pytest.fixture
def secret_arn(secrets, db_url) -> str:
    return secrets.create_secret(Name="queue/db", SecretString=rds_secret(db_url))[
        "ARN"
    ]


def secret_env(arn: str, **extra: str) -> dict[str, str]:
    return {"DB_SECRET_ARN": arn, **extra}


# ----------------------------------------------------------------------- choice


def test_database_url_is_used_as_it_is(db_url):
    provider = conninfo_provider({"DATABASE_URL": db_url})
    assert isinstance(provider, DatabaseUrl)
    assert provider() == db_url


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "no database configured"),
        ({"DATABASE_URL": " "}, "no database configured"),
        (
            {"DATABASE_URL": "postgresql:///x", "DB_SECRET_ARN": "arn:x"},
            "set only one of",
        ),
        ({"DB_SECRET_ARN": "arn:x", "DB_IAM_AUTH": "true"}, "set only one of"),
        ({"DB_IAM_AUTH": "true", "DB_USER": "worker"}, "DB_HOST is required"),
        ({"DB_IAM_AUTH": "true", "DB_HOST": "db.example"}, "DB_USER is required"),
        (
            {"DB_SECRET_ARN": "arn:x", "DB_PORT": "five"},
            "DB_PORT must be a port number",
        ),
        (
            {"DB_SECRET_ARN": "arn:x", "DB_PORT": "\u00b2"},
            "DB_PORT must be a port number",
        ),
        (
            {"DB_SECRET_ARN": "arn:x", "DB_SECRET_MAX_AGE_SECONDS": "0"},
            "DB_SECRET_MAX_AGE_SECONDS must be a whole number above 0",
        ),
    ],
)
def test_unclear_configuration_is_refused_naming_the_setting(environ, message):
    with pytest.raises(ConfigurationError, match=message):
        conninfo_provider(environ)


# ----------------------------------------------------------------------- secret


def test_secret_gives_a_working_connection(secret_arn, db_url):
    # GIVEN the RDS-format secret of the test database
    provider = conninfo_provider(secret_env(secret_arn))
    assert isinstance(provider, SecretsManagerCredentials)

    # WHEN a connection is opened with what it gives
    conninfo = conninfo_to_dict(provider())
    holder = ConnectionHolder(provider)

    # THEN TLS is required by default, and the server is the secret's
    assert conninfo["sslmode"] == "require"
    assert conninfo["password"] == PASSWORD
    row = holder.get().execute("SELECT current_database()").fetchone()
    assert row[0] == conninfo_to_dict(db_url)["dbname"]
    holder.discard()


def test_environment_overrides_what_the_secret_names(secrets, db_url):
    # GIVEN a secret with only credentials, as for a manually created secret
    arn = secrets.create_secret(
        Name="queue/creds", SecretString=json.dumps({"username": "u", "password": "p"})
    )["ARN"]

    # WHEN the server is named by the environment (an RDS Proxy endpoint, say)
    provider = conninfo_provider(
        secret_env(
            arn,
            DB_HOST="proxy.example",
            DB_PORT="6432",
            DB_NAME="queue",
            DB_SSLMODE="verify-full",
            DB_SSLROOTCERT="/var/task/global-bundle.pem",
        )
    )

    # THEN the connection string joins both
    assert conninfo_to_dict(provider()) == {
        "host": "proxy.example",
        "port": "6432",
        "dbname": "queue",
        "user": "u",
        "password": "p",
        "sslmode": "verify-full",
        "sslrootcert": "/var/task/global-bundle.pem",
    }


def test_secret_is_cached_across_warm_invocations_until_forgotten(
    secrets, secret_arn, db_url
):
    # GIVEN a provider that has read the secret once
    provider = conninfo_provider(secret_env(secret_arn))
    first = provider()

    # WHEN the secret changes (a rotation)
    secrets.put_secret_value(
        SecretId=secret_arn, SecretString=rds_secret(db_url, password="rotated")
    )

    # THEN warm calls keep the cached value: no Secrets Manager call per connection
    assert provider() == first

    # AND once told to forget (a connection was refused), it reads the new one
    provider.forget()
    assert conninfo_to_dict(provider())["password"] == "rotated"


def test_cached_secret_expires_after_its_max_age(secrets, secret_arn, db_url):
    provider = conninfo_provider(secret_env(secret_arn, DB_SECRET_MAX_AGE_SECONDS="1"))
    provider()
    secrets.put_secret_value(
        SecretId=secret_arn, SecretString=rds_secret(db_url, password="rotated")
    )

    db.wait_until(
        lambda: conninfo_to_dict(provider())["password"] == "rotated",
        timeout=15,
        what="the cached secret to expire",
        interval=0.2,
    )


def test_refused_connection_fetches_the_secret_again(secrets, db_url, tmp_path):
    # GIVEN a secret naming a server that is gone, read and cached by a holder
    arn = secrets.create_secret(
        Name="queue/moved", SecretString=rds_secret(db_url, host=str(tmp_path))
    )["ARN"]
    provider = conninfo_provider(secret_env(arn))
    provider()

    # WHEN the secret is corrected (rotated), and the holder connects
    secrets.put_secret_value(SecretId=arn, SecretString=rds_secret(db_url))
    holder = ConnectionHolder(provider, connect_timeout=2)
    connection = holder.get()

    # THEN the refused attempt made it read the new secret, and the retry got through
    assert connection.execute("SELECT 1").fetchone() == (1,)
    assert holder.connects == 1
    holder.discard()


@pytest.mark.parametrize(
    ("secret_string", "problem"),
    [
        ("not json", "not a JSON object"),
        ('["a", "list"]', "not a JSON object"),
        (json.dumps({"password": "p", "host": "h"}), 'no "username"'),
        (json.dumps({"username": "u", "host": "h"}), 'no "password"'),
    ],
)
def test_malformed_secret_is_refused_without_its_content(
    secrets, secret_string, problem
):
    arn = secrets.create_secret(Name="queue/bad", SecretString=secret_string)["ARN"]
    provider = conninfo_provider(secret_env(arn))

    with pytest.raises(CredentialsUnavailable, match=problem) as raised:
        provider()
    assert secret_string not in str(raised.value)


def test_missing_secret_is_reported_as_unavailable(secrets):
    provider = conninfo_provider(
        secret_env(f"arn:aws:secretsmanager:{REGION}:123456789012:secret:gone-AbCdEf")
    )
    with pytest.raises(CredentialsUnavailable, match="could not be read"):
        provider()


def test_secret_without_host_needs_db_host(secrets):
    arn = secrets.create_secret(
        Name="queue/nohost", SecretString=json.dumps({"username": "u", "password": "p"})
    )["ARN"]
    with pytest.raises(ConfigurationError, match="DB_HOST"):
        conninfo_provider(secret_env(arn))()


def test_handler_works_with_the_secret_and_never_logs_the_password(
    handler_app,
    handler_log,
    secret_arn,
    conn,
    monkeypatch,
):
    # GIVEN the handler configured with a secret instead of DATABASE_URL
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DB_SECRET_ARN", secret_arn)
    (task_id,) = enqueue_many(conn, [("A", {"n": 1})])

    # WHEN a scheduled tick arrives
    report = handler_app.lambda_handler(
        with_unique_ids(load_event("schedule-default")), LambdaContext(60)
    )

    # THEN the task is done over the secret's credentials
    assert report["completed"] == [task_id]

    # AND the credentials source was logged, naming the secret but not the password
    (configured,) = [
        record
        for record in handler_log.records()
        if record.get("action") == "db_credentials"
    ]
    assert (configured["mode"], configured["secret"]) == ("secret", secret_arn)
    assert "task_completed" in handler_log.actions()
    assert PASSWORD not in handler_log.text()


# ----------------------------------------------------------------------- IAM


def iam_env(**extra: str) -> dict[str, str]:
    return {
        "DB_IAM_AUTH": "true",
        "DB_HOST": "queue.cluster-abc.eu-west-1.rds.amazonaws.com",
        "DB_PORT": "5432",
        "DB_NAME": "queue",
        "DB_USER": "queue_worker",
        "AWS_REGION": REGION,
        **extra,
    }


def test_iam_token_is_signed_for_the_user_and_host_over_tls(aws):
    provider = conninfo_provider(iam_env())
    assert isinstance(provider, IamAuthToken)

    conninfo = conninfo_to_dict(provider())

    assert conninfo["host"] == "queue.cluster-abc.eu-west-1.rds.amazonaws.com"
    assert conninfo["user"] == "queue_worker"
    assert conninfo["dbname"] == "queue"
    assert conninfo["sslmode"] == "require"
    token = conninfo["password"]
    assert token.startswith("queue.cluster-abc.eu-west-1.rds.amazonaws.com:5432/?")
    query = parse_qs(token.split("?", 1)[1])
    assert query["Action"] == ["connect"]
    assert query["DBUser"] == ["queue_worker"]
    assert f"/{REGION}/rds-db/aws4_request" in unquote(query["X-Amz-Credential"][0])
    assert query["X-Amz-Signature"]


def test_each_new_connection_gets_a_fresh_iam_token(aws):
    # GIVEN a token handed out for one connection
    provider = conninfo_provider(iam_env())
    first = conninfo_to_dict(provider())["password"]

    # WHEN later connections are opened
    # THEN they get new tokens, never a cached one (a token lives 15 minutes)
    db.wait_until(
        lambda: conninfo_to_dict(provider())["password"] != first,
        timeout=10,
        what="a newly signed token",
        interval=0.2,
    )


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer"])
def test_iam_refuses_connections_without_tls(aws, sslmode):
    with pytest.raises(ConfigurationError, match="only accepted over TLS"):
        conninfo_provider(iam_env(DB_SSLMODE=sslmode))


def test_iam_needs_a_region(aws, monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    environ = iam_env()
    del environ["AWS_REGION"]
    with pytest.raises(ConfigurationError, match="AWS_REGION"):
        conninfo_provider(environ)


def test_iam_configuration_log_names_no_token(aws, handler_log):
    provider = conninfo_provider(iam_env())
    token = conninfo_to_dict(provider())["password"]

    assert "db_credentials" in handler_log.actions()
    assert token not in handler_log.text()
    assert "X-Amz-Signature" not in handler_log.text()
