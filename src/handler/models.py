"""Input models of the entry points, validated with the Powertools parser (pydantic)."""

from typing import Any

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from queue_core.validation import BATCH_ID_RULE, check_batch_id

WORKER_ID_PATTERN = r"^[\x21-\x7e]{1,128}$"


class WorkRequest(BaseModel):
    """What to work: a POST /process-task body, a direct invoke, a schedule Input."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    batch_id: str | None = Field(
        default=None,
        alias="batchId",
        description=f"The batch to work first; {BATCH_ID_RULE}.",
    )
    worker_id: str | None = Field(
        default=None,
        alias="workerId",
        pattern=WORKER_ID_PATTERN,
        description="Who is working; defaults to the invocation's request id.",
    )
    max_batches: int | None = Field(
        default=None,
        alias="maxBatches",
        ge=1,
        le=1000,
        description="Batches to work in turn while time allows; default "
        "WORKER_MAX_BATCHES.",
    )

    @field_validator("batch_id")
    @classmethod
    def _batch_id_format(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            return check_batch_id(value)
        except ValueError:
            raise ValueError(BATCH_ID_RULE) from None


class ScheduledTick(EventBridgeModel):
    """The every-minute tick of an EventBridge rule or schedule. It carries nothing: a
    batch to work first goes in the target's Input, which replaces the whole event."""

    @field_validator("detail_type")
    @classmethod
    def _scheduled(cls, value: str) -> str:
        if value != "Scheduled Event":
            raise ValueError(
                f'must be "Scheduled Event", got {value!r}: other events are not ticks'
            )
        return value

    @field_validator("detail", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        # EventBridge sends {}; EventBridge Scheduler sends the text "{}".
        if value in ({}, "{}"):
            return {}
        raise ValueError(
            "must be empty: to work a batch first, set the target's Input to "
            '{"batchId": "B"}'
        )


def describe_errors(error: ValidationError) -> list[dict[str, str]]:
    """One {field, rule} per problem, in the field names the caller used."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "body"
        rule = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            rule = "is not a known field (known: batchId, workerId, maxBatches)"
        elif item["type"] == "string_pattern_mismatch" and field == "workerId":
            rule = "must be 1-128 printable ASCII characters without spaces"
        problems.append({"field": field, "rule": rule})
    return problems
