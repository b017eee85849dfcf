"""Config schema of post-training (R1): task families, rule rewards, cold-start SFT.

Kept apart from `schema.py` (pretraining); `Config` holds them as `tasks`, `rewards` and `sft`. Their
rules: dsv3/rl/config_rules.py."""
from dataclasses import dataclass, field
from typing import Any, Optional

from dsv3.rl.template import R1_SPECIAL_TOKENS, R1_SYSTEM_PROMPT


@dataclass
class TaskConfig:
    """Which verifiable problems (dsv3/rl/tasks.py) a run draws."""

    families: list[str] = field(default_factory=lambda: ["arithmetic", "countdown", "linear_equation"])
    """Any of: arithmetic, countdown, linear_equation."""
    difficulties: list[int] = field(default_factory=lambda: [1])
    """Difficulty levels drawn from, evenly (1..5)."""
    held_out_fraction: float = 0.1
    """Share of each family's problem space held out (by a hash of the problem); never trained on."""
    seed: int = 0
    """Seeds which problems are drawn (the split does not depend on it)."""


@dataclass
class RewardTerm:
    """One rule reward with its weight; the reward of a completion is the weighted sum of its terms."""

    name: str = "accuracy"
    """accuracy | format | overlong | repetition (dsv3/rl/rewards.py)."""
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward function (e.g. overlong: max_tokens, buffer_tokens)."""


@dataclass
class SFTConfig:
    """Cold-start SFT (launch/sft.py): prompt/completion pairs, loss on completion tokens only."""

    source: str = "tasks"
    """`tasks`: examples generated from `tasks` with their programmatic step-by-step traces, in the R1
    template; `jsonl`: `path` holds one {"prompt": ..., "completion": ...} object per line (the prompt
    is the question; the template is applied unless `raw` is true)."""
    path: Optional[str] = None
    """The JSONL file when source=jsonl."""
    raw: bool = False
    """jsonl only: take prompt and completion text as they are, without the template."""
    examples: int = 2000
    """Training examples generated when source=tasks."""
    val_examples: int = 64
    """Held-out examples (source=tasks: from the held-out split; jsonl: the file's last lines)."""
    system_prompt: str = R1_SYSTEM_PROMPT
    """Text before "User: ..." in every prompt; "" = none."""
    special_tokens: list[str] = field(default_factory=lambda: list(R1_SPECIAL_TOKENS))
    """Added to the base tokenizer (the model's embedding and head grow by as many rows)."""
    tokenizer: Optional[str] = None
    """Base tokenizer.json; default: the one the `checkpoint.init_from` model was trained with."""
    packing: bool = True
    """Pack several examples per sequence (attention crosses example boundaries, as pretraining's
    packed documents do; each example's loss covers only its completion). false: one example per
    sequence, padded: no attention between examples, more padding."""
