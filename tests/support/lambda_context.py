"""The context object the Lambda runtime passes to a handler, with a real deadline."""

import time
import uuid


class LambdaContext:
    function_name = "task-queue-worker"
    function_version = "$LATEST"
    invoked_function_arn = (
        "arn:aws:lambda:eu-west-1:123456789012:function:task-queue-worker"
    )
    memory_limit_in_mb = 256
    log_group_name = "/aws/lambda/task-queue-worker"
    log_stream_name = "2026/12/04/[$LATEST]0123456789abcdef"

    def __init__(self, remaining_seconds: float = 60.0) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + remaining_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))
