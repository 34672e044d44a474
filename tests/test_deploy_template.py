"""template.yaml, samconfig.toml and the package `sam build` makes, checked offline:
cfn-lint on the SAM template and on the CloudFormation the SAM translator makes of it,
the deployment rules the queue depends on, and the packaged code run on a real
database. `sam build` itself runs where `sam` and Python 3.12 are installed."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import boto3
import pytest
from cfnlint.decode import decode
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator

from queue_core import enqueue_many

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "template.yaml"
CFN_LINT = Path(sys.executable).parent / "cfn-lint"


def cfn_lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CFN_LINT), str(path)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def translated(tmp_path_factory) -> dict:
    """The CloudFormation template that `sam deploy` sends, once packaged."""
    template, problems = decode(str(TEMPLATE))
    assert not problems, problems
    # What `sam package` does: the code is an S3 object by then.
    template["Resources"]["QueueWorkerFunction"]["Properties"]["CodeUri"] = (
        "s3://artifacts/queue-worker.zip"
    )
    session = boto3.Session(
        region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    return Translator(
        managed_policy_map={}, sam_parser=Parser(), boto_session=session
    ).translate(sam_template=template, parameter_values={})


def resources_of(template: dict, kind: str) -> dict[str, dict]:
    return {
        name: resource
        for name, resource in template["Resources"].items()
        if resource["Type"] == kind
    }


# ----------------------------------------------------------------------- lint


def test_cfn_lint_passes_on_the_sam_template():
    result = cfn_lint(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_passes_on_the_translated_cloudformation(translated, tmp_path):
    path = tmp_path / "translated.json"
    path.write_text(json.dumps(translated, default=str))

    result = cfn_lint(path)

    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------- rules


def test_function_runtime_url_and_no_late_replays(translated):
    (function,) = resources_of(translated, "AWS::Lambda::Function").values()
    properties = function["Properties"]
    assert properties["Runtime"] in ("python3.12", "python3.13")
    assert properties["Architectures"] == ["arm64"]
    assert properties["Handler"] == "handler.app.lambda_handler"
    for name in ("Timeout", "MemorySize", "ReservedConcurrentExecutions"):
        assert "Ref" in properties[name], name
    assert properties["VpcConfig"]["Fn::If"][0] == "HasVpc"
    assert properties["LoggingConfig"]["LogFormat"] == "JSON"
    assert properties["LoggingConfig"]["LogGroup"] == {"Ref": "QueueWorkerLogGroup"}

    # The Function URL needs a SigV4 signature: never AuthType NONE
    (url,) = resources_of(translated, "AWS::Lambda::Url").values()
    assert url["Properties"]["AuthType"] == "AWS_IAM"

    # Neither the scheduler nor Lambda's asynchronous queue replays a tick late
    (schedule,) = resources_of(translated, "AWS::Scheduler::Schedule").values()
    assert schedule["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    assert schedule["Properties"]["Target"]["RetryPolicy"] == {
        "MaximumRetryAttempts": 0,
        "MaximumEventAgeInSeconds": 60,
    }
    (invoke_config,) = resources_of(
        translated, "AWS::Lambda::EventInvokeConfig"
    ).values()
    assert invoke_config["Properties"]["MaximumRetryAttempts"] == 0
    assert invoke_config["Properties"]["MaximumEventAgeInSeconds"] == 60


def test_log_group_has_retention(translated):
    (group,) = resources_of(translated, "AWS::Logs::LogGroup").values()
    assert group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_worker_role_grants_only_what_each_database_mode_needs(translated):
    role = translated["Resources"]["QueueWorkerRole"]["Properties"]
    (policy,) = role["Policies"]
    statements = policy["PolicyDocument"]["Statement"]
    plain = [s for s in statements if "Sid" in s]
    conditional = {
        s["Fn::If"][1]["Sid"]: (s["Fn::If"][0], s["Fn::If"][1])
        for s in statements
        if "Fn::If" in s
    }

    # Logs only into its own group; no wildcard actions anywhere
    logs = next(s for s in plain if s["Sid"] == "OwnLogs")
    assert logs["Resource"] == {"Fn::GetAtt": ["QueueWorkerLogGroup", "Arn"]}
    every = plain + [statement for _, statement in conditional.values()]
    assert all("*" not in action for s in every for action in _actions(s))

    # The secret's read only in secret mode, on that secret alone
    condition, secret = conditional["ReadDatabaseSecret"]
    assert condition == "HasSecretArn"
    assert secret["Action"] == "secretsmanager:GetSecretValue"
    assert secret["Resource"] == {"Ref": "DbSecretArn"}

    # rds-db:connect only in IAM mode, for one database user
    condition, connect = conditional["ConnectAsDatabaseUser"]
    assert condition == "UseIam"
    assert connect["Action"] == "rds-db:connect"
    assert connect["Resource"]["Fn::Sub"].endswith(":dbuser:${DbResourceId}/${DbUser}")

    # The environment tells the handler which mode it is in
    (function,) = resources_of(translated, "AWS::Lambda::Function").values()
    variables = function["Properties"]["Environment"]["Variables"]
    assert variables["DB_SECRET_ARN"] == {
        "Fn::If": ["UseSecret", {"Ref": "DbSecretArn"}, ""]
    }
    assert variables["DB_IAM_AUTH"] == {"Fn::If": ["UseIam", "true", "false"]}
    assert variables["DB_HOST"]["Fn::If"][0] == "HasProxy"


def test_alarms_watch_what_the_issue_asks(translated):
    alarms = resources_of(translated, "AWS::CloudWatch::Alarm").values()
    watched = set()
    for alarm in alarms:
        properties = alarm["Properties"]
        assert properties["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        if "MetricName" in properties:
            watched.add(properties["MetricName"])
        for query in properties.get("Metrics", []):
            if "MetricStat" in query:
                watched.add(query["MetricStat"]["Metric"]["MetricName"])
    assert {
        "Errors",
        "Throttles",
        "Duration",
        "TasksDeadLettered",
        "OldestPendingAge",
    } <= watched


def test_dashboard_shows_depth_age_completions_and_failures(translated):
    (dashboard,) = resources_of(translated, "AWS::CloudWatch::Dashboard").values()
    body = dashboard["Properties"]["DashboardBody"]["Fn::Sub"]
    # Substituted the way CloudFormation will: every ${...} becomes a value.
    document = json.loads(re.sub(r"\$\{[^}]+\}", "1", body))

    metrics = {
        entry
        for widget in document["widgets"]
        for line in widget["properties"].get("metrics", [])
        for entry in line
        if isinstance(entry, str)
    }
    assert {
        "QueueDepth",
        "OldestPendingAge",
        "TasksCompleted",
        "TasksFailed",
    } <= metrics
    queries = [
        w["properties"]["query"] for w in document["widgets"] if w["type"] == "log"
    ]
    assert any("task_completed" in query for query in queries)


def test_outputs_name_the_function_and_its_url(translated):
    assert {"FunctionName", "FunctionUrl"} <= set(translated["Outputs"])


def test_samconfig_has_a_default_and_a_production_environment():
    config = tomllib.loads((REPO_ROOT / "samconfig.toml").read_text())
    for environment in ("default", "prod"):
        deploy = config[environment]["deploy"]["parameters"]
        assert deploy["capabilities"] == "CAPABILITY_IAM"
        assert config[environment]["build"]["parameters"]["build_in_source"] is True
    stacks = {
        config[name]["global"]["parameters"]["stack_name"]
        for name in config
        if name != "version"
    }
    assert len(stacks) == 2


# ----------------------------------------------------------------------- package


def test_packaged_code_runs_the_handler_on_a_real_database(tmp_path, db_url, conn):
    # GIVEN the project's part of the package, as the build target lays it out
    artifacts = tmp_path / "artifacts"
    build = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "lambda-sources",
            f"ARTIFACTS_DIR={artifacts}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    assert sorted(path.name for path in artifacts.iterdir()) == [
        "handler",
        "queue_core",
        "sql",
    ]
    assert not list(artifacts.rglob("__pycache__"))
    (task_id,) = enqueue_many(conn, [("A", {})])

    # WHEN Lambda would import and call it: the package at the root of sys.path, the
    # repository nowhere on it
    script = (
        "import json, os, handler.app as app, queue_core\n"
        "root = os.environ['PACKAGE_ROOT']\n"
        "assert queue_core.__file__.startswith(root), queue_core.__file__\n"
        "class Context:\n"
        "    aws_request_id = 'packaged-1'\n"
        "    function_name = 'f'; function_version = '1'; memory_limit_in_mb = 128\n"
        "    invoked_function_arn = 'arn:aws:lambda:eu-west-1:1:function:f'\n"
        "    def get_remaining_time_in_millis(self): return 30000\n"
        "event = {'batchId': 'A'}\n"
        "print('RESPONSE ' + json.dumps(app.lambda_handler(event, Context())))\n"
    )
    environment = {
        key: value for key, value in os.environ.items() if key != "PYTHONPATH"
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={
            **environment,
            "PYTHONPATH": str(artifacts),
            "PACKAGE_ROOT": str(artifacts),
            "DATABASE_URL": db_url,
            "POWERTOOLS_TRACE_DISABLED": "1",
            "TASK_PROCESSOR": "queue_core.processor:no_work",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )

    # THEN it found its SQL beside its packages, and did the task
    assert result.returncode == 0, result.stderr + result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESPONSE "))
    assert json.loads(line.removeprefix("RESPONSE "))["completed"] == [task_id]


def _sam_build_unavailable() -> str | None:
    if shutil.which("sam") is None:
        return "the SAM CLI (sam) is not installed"
    python = shutil.which("python3.12")
    if python is None:
        return "python3.12 is not on the PATH"
    probe = subprocess.run([python, "--version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return "python3.12 on the PATH does not run (a pyenv shim of another version?)"
    return None


@pytest.mark.skipif(
    _sam_build_unavailable() is not None,
    reason=f"sam build without Docker: {_sam_build_unavailable()}",
)
@pytest.mark.slow
def test_sam_build_succeeds_without_docker(tmp_path):
    # GIVEN a clean copy of the repository's tracked files
    files = (
        subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)

    # AND what `make run` leaves behind: a server socket SAM could not copy
    (tmp_path / ".pgdata").mkdir()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / ".pgdata" / ".s.PGSQL.5432"))

        # WHEN sam build runs with samconfig.toml's settings (in the source tree)
        result = subprocess.run(
            ["sam", "build"],
            cwd=tmp_path,
            env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
            capture_output=True,
            text=True,
            timeout=900,
        )

    # THEN the package holds the code, the SQL and arm64 wheels of the dependencies
    assert result.returncode == 0, result.stdout + result.stderr
    built = tmp_path / ".aws-sam" / "build" / "QueueWorkerFunction"
    assert (built / "handler" / "app.py").is_file()
    assert (built / "sql" / "queries.sql").is_file()
    assert (built / "aws_lambda_powertools").is_dir()
    assert any("aarch64" in path.name for path in built.rglob("*.so"))


def _actions(statement: dict) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)
