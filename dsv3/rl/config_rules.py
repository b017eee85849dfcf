"""Config rules of post-training (`tasks.*`, `rewards`, `sft.*`), registered in dsv3/config/rules.py."""
import os

from dsv3.config.errors import ConfigError
from dsv3.config.rules import World
from dsv3.config.schema import Config
from dsv3.rl.tasks import FAMILIES, MAX_DIFFICULTY


def post_training_rules(cfg: Config, world: World) -> None:
    """The rules of the tasks, rewards and sft sections."""
    t = cfg.tasks
    for f in t.families:
        if f not in FAMILIES:
            raise ConfigError("tasks.families", t.families, f"{f!r} is not one of {', '.join(FAMILIES)}")
    if not t.families:
        raise ConfigError("tasks.families", t.families, "must name at least one family")
    if not t.difficulties or any(not 1 <= d <= MAX_DIFFICULTY for d in t.difficulties):
        raise ConfigError("tasks.difficulties", t.difficulties, f"must be levels in 1..{MAX_DIFFICULTY}")
    if not 0 < t.held_out_fraction < 1:
        raise ConfigError("tasks.held_out_fraction", t.held_out_fraction, "must be in (0, 1)")
    from dsv3.rl.rewards import WeightedReward

    try:
        WeightedReward(cfg.rewards)
    except ValueError as e:
        raise ConfigError("rewards", [r.name for r in cfg.rewards], str(e)) from None
    s = cfg.sft
    if s.source not in ("tasks", "jsonl"):
        raise ConfigError("sft.source", s.source, "must be one of tasks, jsonl")
    if s.source == "jsonl" and not (s.path and os.path.isfile(s.path)):
        raise ConfigError("sft.path", s.path, "must be an existing JSONL file when sft.source=jsonl")
    if s.examples < 1:
        raise ConfigError("sft.examples", s.examples, "must be >= 1")
    if s.val_examples < 1:
        raise ConfigError("sft.val_examples", s.val_examples, "must be >= 1")
    if s.tokenizer is not None and not os.path.isfile(s.tokenizer):
        raise ConfigError("sft.tokenizer", s.tokenizer, "must be an existing tokenizer.json")


RULES = (post_training_rules,)
