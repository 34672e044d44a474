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
