"""Exceptions a caller of the queue can act on. All derive from QueueError."""


class QueueError(Exception):
    """Root of the queue's own errors."""


class InvalidInput(QueueError, ValueError):
    """A value breaks a rule; the message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class ConfigurationError(QueueError):
    """A setting read from the environment is missing or malformed."""


class DatabaseUnavailable(QueueError):
    """The database could not be reached, even after retrying."""


class UnknownBatch(QueueError, LookupError):
    """No batch of that name exists (it has never had a task nor a policy)."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"batch {batch_id!r} does not exist")
        self.batch_id = batch_id
