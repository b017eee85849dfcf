"""The one registry of configuration rules, and the helpers they are written with.

Each package states the rules of its own keys in its `config_rules.py`: a tuple `RULES` of functions
`rule(cfg, world)` that raise `ConfigError` naming the first offending key, the value and what
is allowed. `dsv3.config.validate` runs every package's rules, in `RULE_MODULES` order, once, before
any process does work; the launcher prints the one line and exits 2. What a rule guarantees, the
code that runs later asserts instead of checking again.

No import cycle: a package's rules import this leaf module (and `errors`), never the validator, and
the validator imports them by name only when it runs.
"""
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from dsv3.config.errors import ConfigError

# In the order their rules run (so the order in which errors are found).
RULE_MODULES = (
    "dsv3.model.config_rules",      # model.*
    "dsv3.data.config_rules",       # data.*, and the data's vocabulary against model.vocab_size
    "dsv3.train.config_rules",      # precision.dtype, optim.*, train.*, checkpoint.*
    "dsv3.rl.config_rules",         # tasks.*, rewards, sft.* (post-training)
    "dsv3.parallel.config_rules",   # parallel.*, and how the batch splits over the plan
    "dsv3.fp8.config_rules",        # precision.fp8.* and the device FP8 needs
    "dsv3.kernels.config_rules",    # kernels.*: the implementation asked for runs on this device
    "dsv3.planner.config_rules",    # hardware.* (what the planner plans for)
)



@dataclass(frozen=True)
class World:
    """The processes the run will have (torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE)."""

    size: int = 1
    local_size: int = 1  # ranks per node


Rule = Callable[[Any, World], None]  # (the Config, the world)


def registered_rules() -> list[Rule]:
    return [rule for name in RULE_MODULES for rule in importlib.import_module(name).RULES]


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def one_of(key: str, value: Any, choices: tuple) -> None:
    require(value in choices, key, value, f"must be one of {', '.join(choices)}")


def positive(section: Any, prefix: str, names: list[str]) -> None:
    for name in names:
        value = getattr(section, name)
        require(value > 0, f"{prefix}.{name}", value, "must be > 0")
