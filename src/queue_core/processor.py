"""The function that does a task's work, chosen by TASK_PROCESSOR as module:function."""

import importlib
import os
import random
import time
from collections.abc import Callable
from functools import cache

from queue_core.errors import ConfigurationError
from queue_core.models import Task

Processor = Callable[[Task], object]


def simulated_work(task: Task) -> None:
    """Stand-in for the original 1-2 s job; SIMULATED_TASK_SECONDS="low-high"."""
    low, high = _simulated_range(os.environ.get("SIMULATED_TASK_SECONDS", "1-2"))
    time.sleep(random.uniform(low, high))


def no_work(task: Task) -> None:
    """A processor that does nothing: for benchmarks of the queue itself."""


@cache
def load_processor(spec: str) -> Processor:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigurationError(
            f"TASK_PROCESSOR must be module:function, got {spec!r}"
        )
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigurationError(
            f"TASK_PROCESSOR {spec!r} cannot be loaded: {error}"
        ) from None
    if not callable(function):
        raise ConfigurationError(f"TASK_PROCESSOR {spec!r} is not callable")
    return function


@cache
def _simulated_range(raw: str) -> tuple[float, float]:
    low, _, high = raw.partition("-")
    try:
        return float(low), float(high or low)
    except ValueError:
        raise ConfigurationError(
            f"SIMULATED_TASK_SECONDS must be 'low-high' seconds, got {raw!r}"
        ) from None
