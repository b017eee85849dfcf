"""The one error type of configuration rules, in a leaf module so that any package's rules (e.g.
dsv3.parallel.pipeline's) can raise it without importing the validation of everything else."""
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value: which key, what was given, and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config: {key}={value!r}: {allowed}")
