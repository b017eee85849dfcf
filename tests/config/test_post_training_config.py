"""The tasks, rewards and sft sections: composed from YAML, validated once, each bad value named."""
import dataclasses

import pytest

from dsv3.config import ConfigError, validate
from dsv3.config.post_training import RewardTerm
from dsv3.config.schema import Config
from test_experiments import compose_experiment

BAD = [
    (lambda c: c.tasks.families.append("sudoku"), "tasks.families"),
    (lambda c: setattr(c.tasks, "difficulties", [0]), "tasks.difficulties"),
    (lambda c: setattr(c.tasks, "held_out_fraction", 1.0), "tasks.held_out_fraction"),
    (lambda c: c.rewards.append(RewardTerm("speed")), "rewards"),
    (lambda c: setattr(c, "rewards", [RewardTerm("overlong", params={"max_tokens": 9})]), "rewards"),
    (lambda c: setattr(c.sft, "source", "hub"), "sft.source"),
    (lambda c: setattr(c.sft, "source", "jsonl"), "sft.path"),
    (lambda c: setattr(c.sft, "tokenizer", "/nonexistent/tokenizer.json"), "sft.tokenizer"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_post_training_values_are_named(i):
    cfg = Config()
    change, key = BAD[i]
    change(cfg)
    with pytest.raises(ConfigError, match=f"invalid config: {key}="):
        validate(cfg)


def test_rewards_and_tasks_compose_from_overrides():
    cfg = compose_experiment("sft_tiny", "tasks.difficulties=[1,2]",
                             "rewards=[{name: accuracy, weight: 1.0}, {name: overlong, weight: 0.5, "
                             "params: {max_tokens: 64, buffer_tokens: 16}}]")
    assert cfg.tasks.difficulties == [1, 2]
    assert [dataclasses.astuple(r) for r in cfg.rewards] == [("accuracy", 1.0, {}),
                                                             ("overlong", 0.5, {"max_tokens": 64, "buffer_tokens": 16})]
    validate(cfg)
