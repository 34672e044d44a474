"""Where the worker's database connection string comes from, in Lambda.

One source, chosen by the environment:

- ``DATABASE_URL``: a libpq URL or conninfo string, used as it is (local runs, tests).
- ``DB_SECRET_ARN``: a Secrets Manager secret holding ``username`` and ``password``
  (the RDS format also holds ``host``, ``port`` and ``dbname``), read with Powertools
  Parameters and cached for ``DB_SECRET_MAX_AGE_SECONDS`` (default 300) across warm
  invocations.
- ``DB_IAM_AUTH=true``: RDS IAM authentication; every new connection gets a fresh
  token from boto3's ``generate_db_auth_token`` (a local signature, valid 15 minutes,
  needed only to connect), over TLS.

``DB_HOST``, ``DB_PORT``, ``DB_NAME`` and ``DB_USER`` name the server (for a secret they
override what it holds; an RDS Proxy endpoint goes in ``DB_HOST``). ``DB_SSLMODE``
defaults to ``require`` for both AWS sources, and IAM refuses anything weaker;
``DB_SSLROOTCERT`` points at a CA bundle for ``verify-full``.

Neither the password nor a connection string that holds one is ever logged: logs carry
what ``describe()`` returns.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from queue_core.errors import ConfigurationError, DatabaseUnavailable
from queue_core.validation import whole_number

log = logging.getLogger(__name__)

DEFAULT_SECRET_MAX_AGE_SECONDS = 300
TLS_MODES = ("require", "verify-ca", "verify-full")
_TRUE = ("1", "true", "yes", "on")


class CredentialsUnavailable(DatabaseUnavailable):
    """The database credentials could not be fetched (Secrets Manager refused or
    failed, or the secret is malformed)."""


@dataclass(frozen=True)
class Endpoint:
    """The server to connect to, as far as the environment names it."""

    host: str | None
    port: int | None
    dbname: str | None
    user: str | None
    sslmode: str
    sslrootcert: str | None

    def conninfo(self, user: str, password: str, **known: Any) -> str:
        """A libpq conninfo string; known fills what the environment left unset."""
        params = {
            "host": self.host or known.get("host"),
            "port": self.port or known.get("port"),
            "dbname": self.dbname or known.get("dbname"),
            "user": user,
            "password": password,
            "sslmode": self.sslmode,
            "sslrootcert": self.sslrootcert,
        }
        return make_conninfo(
            "", **{key: value for key, value in params.items() if value is not None}
        )


class DatabaseUrl:
    """DATABASE_URL, as it is."""

    mode = "url"

    def __init__(self, url: str) -> None:
        self._url = url

    def __call__(self) -> str:
        return self._url

    def forget(self) -> None:
        """Nothing is cached."""

    def describe(self) -> dict[str, Any]:
        try:
            params = conninfo_to_dict(self._url)
        except psycopg.ProgrammingError:
            return {"mode": self.mode}
        return {
            "mode": self.mode,
            **{key: params.get(key) for key in ("host", "port", "dbname", "user")},
        }


class SecretsManagerCredentials:
    """Username and password from a Secrets Manager secret, cached while warm."""

    mode = "secret"

    def __init__(self, secret_id: str, endpoint: Endpoint, max_age: int) -> None:
        self._secret_id = secret_id
        self._endpoint = endpoint
        self._max_age = max_age
        self._refetch = False

    def __call__(self) -> str:
        secret = self._fetch()
        username = secret.get("username")
        password = secret.get("password")
        if not isinstance(username, str) or not username:
            raise CredentialsUnavailable('the secret has no "username" string')
        if not isinstance(password, str):
            raise CredentialsUnavailable('the secret has no "password" string')

        known = {key: secret.get(key) for key in ("host", "port", "dbname")}
        if not (self._endpoint.host or known["host"]):
            raise ConfigurationError('DB_HOST is not set and the secret has no "host"')
        return self._endpoint.conninfo(
            self._endpoint.user or username, password, **known
        )

    def forget(self) -> None:
        """Fetch the secret again on the next call: the password may have rotated."""
        self._refetch = True

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "secret": self._secret_id,
            "host": self._endpoint.host,
            "port": self._endpoint.port,
            "dbname": self._endpoint.dbname,
            "sslmode": self._endpoint.sslmode,
            "max_age_seconds": self._max_age,
        }

    def _fetch(self) -> dict[str, Any]:
        # Imported here: the other sources do not pay for boto3 at cold start.
        from aws_lambda_powertools.utilities import parameters

        refetch, self._refetch = self._refetch, False
        log.debug(
            "reading the database secret",
            extra={"action": "db_secret_read", "force_fetch": refetch},
        )
        try:
            secret = parameters.get_secret(
                self._secret_id,
                transform="json",
                max_age=self._max_age,
                force_fetch=refetch,
            )
        except parameters.TransformParameterError:
            raise CredentialsUnavailable("the secret is not a JSON object") from None
        except parameters.GetParameterError as error:
            # The message may quote the service's answer; the class name is enough.
            cause = type(error.__cause__ or error).__name__
            raise CredentialsUnavailable(
                f"the database secret could not be read ({cause})"
            ) from error
        if not isinstance(secret, dict):
            raise CredentialsUnavailable("the secret is not a JSON object")
        return secret


class IamAuthToken:
    """A fresh RDS IAM authentication token for every new connection, over TLS."""

    mode = "iam"

    def __init__(self, endpoint: Endpoint, region: str) -> None:
        self._endpoint = endpoint
        self._region = region
        self._client = None

    def __call__(self) -> str:
        endpoint = self._endpoint
        token = self._rds().generate_db_auth_token(
            DBHostname=endpoint.host,
            Port=endpoint.port or 5432,
            DBUsername=endpoint.user,
            Region=self._region,
        )
        log.debug("signed an RDS IAM token", extra={"action": "db_iam_token"})
        return endpoint.conninfo(endpoint.user or "", token, port=5432)

    def forget(self) -> None:
        """Nothing is cached: each call signs a new token."""

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "host": self._endpoint.host,
            "port": self._endpoint.port or 5432,
            "dbname": self._endpoint.dbname,
            "user": self._endpoint.user,
            "sslmode": self._endpoint.sslmode,
            "region": self._region,
        }

    def _rds(self):
        if self._client is None:
            # Imported here: the other sources do not pay for boto3 at cold start.
            import boto3

            self._client = boto3.client("rds", region_name=self._region)
        return self._client


ConninfoProvider = DatabaseUrl | SecretsManagerCredentials | IamAuthToken


def conninfo_provider(environ: Mapping[str, str]) -> ConninfoProvider:
    """The source of connection strings that the environment configures."""
    url = environ.get("DATABASE_URL", "").strip()
    secret_id = environ.get("DB_SECRET_ARN", "").strip()
    iam = environ.get("DB_IAM_AUTH", "").strip().lower() in _TRUE

    chosen = [
        name
        for name, given in (
            ("DATABASE_URL", url),
            ("DB_SECRET_ARN", secret_id),
            ("DB_IAM_AUTH", iam),
        )
        if given
    ]
    if not chosen:
        raise ConfigurationError(
            "no database configured: set DATABASE_URL, DB_SECRET_ARN or DB_IAM_AUTH"
        )
    if len(chosen) > 1:
        raise ConfigurationError(
            f"set only one of DATABASE_URL, DB_SECRET_ARN, DB_IAM_AUTH (got "
            f"{', '.join(chosen)})"
        )

    provider: ConninfoProvider
    if url:
        provider = DatabaseUrl(url)
    elif secret_id:
        provider = SecretsManagerCredentials(
            secret_id,
            _endpoint(environ),
            _positive_int(
                environ, "DB_SECRET_MAX_AGE_SECONDS", DEFAULT_SECRET_MAX_AGE_SECONDS
            ),
        )
    else:
        provider = _iam_provider(environ)
    log.info(
        "database credentials configured",
        extra={"action": "db_credentials", **provider.describe()},
    )
    return provider


def _iam_provider(environ: Mapping[str, str]) -> IamAuthToken:
    endpoint = _endpoint(environ)
    for name, value in (("DB_HOST", endpoint.host), ("DB_USER", endpoint.user)):
        if not value:
            raise ConfigurationError(f"{name} is required with DB_IAM_AUTH")
    if endpoint.sslmode not in TLS_MODES:
        raise ConfigurationError(
            f"DB_SSLMODE must be one of {', '.join(TLS_MODES)} with DB_IAM_AUTH "
            f"(IAM tokens are only accepted over TLS), got {endpoint.sslmode!r}"
        )
    region = next(
        (
            value
            for name in ("DB_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
            if (value := environ.get(name, "").strip())
        ),
        None,
    )
    if region is None:
        raise ConfigurationError(
            "AWS_REGION (or DB_REGION) is required with DB_IAM_AUTH"
        )
    return IamAuthToken(endpoint, region)


def _endpoint(environ: Mapping[str, str]) -> Endpoint:
    def text(name: str) -> str | None:
        return environ.get(name, "").strip() or None

    port = text("DB_PORT")
    port_number = whole_number(port) if port is not None else None
    if port is not None and not (port_number and port_number < 65536):
        raise ConfigurationError(f"DB_PORT must be a port number, got {port!r}")
    return Endpoint(
        host=text("DB_HOST"),
        port=port_number,
        dbname=text("DB_NAME"),
        user=text("DB_USER"),
        sslmode=text("DB_SSLMODE") or "require",
        sslrootcert=text("DB_SSLROOTCERT"),
    )


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    value = whole_number(raw)
    if value is None or value <= 0:
        raise ConfigurationError(f"{name} must be a whole number above 0, got {raw!r}")
    return value
