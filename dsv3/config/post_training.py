"""Config schema of post-training (R1): task families, rule rewards, cold-start SFT, GRPO.

Kept apart from `schema.py` (pretraining); `Config` holds them as `tasks`, `rewards`, `sft`, `rl` and
`rejection`. Their rules: dsv3/rl/config_rules.py."""
from dataclasses import dataclass, field
from typing import Any, Optional

from dsv3.rl.template import R1_SPECIAL_TOKENS, R1_SYSTEM_PROMPT

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "constant")


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


@dataclass
class GRPOConfig:
    """GRPO (launch/grpo.py, dsv3/rl/grpo.py): G samples per prompt from the current policy, rule rewards,
    group-normalized advantages, the clipped-ratio objective and a KL term to the frozen start model. The
    variants of the GRPO, DAPO and Dr. GRPO papers are switches here. One RL step = one batch of samples
    and `mu` optimizer steps on it; `train.max_steps` counts RL steps, `train.micro_batch_size` is
    sequences per forward, `train.seed` seeds sampling; `train.global_batch_size` is not used."""

    num_generations: int = 8
    """G: samples per prompt (a group); >= 2."""
    prompts_per_step: int = 16
    """Groups per RL step (whole run, all ranks): the batch is prompts_per_step x G samples."""
    prompt_pool: int = 2048
    """Training prompts: this many problems of `tasks` (train split), visited in a seeded order, epoch by epoch."""
    max_new_tokens: int = 128
    """Completion tokens at most; a completion cut there is truncated."""
    temperature: float = 1.0
    """Sampling temperature; the policy's log-probabilities are those of softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling (1 = off). The objective still uses the untruncated policy's log-probabilities."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    epsilon: float = 0.2
    """Lower clip: the ratio is clipped below at 1 - epsilon."""
    epsilon_high: float = 0.2
    """Upper clip: the ratio is clipped above at 1 + epsilon_high (DAPO's clip-higher: 0.28)."""
    beta: float = 0.0
    """Weight of the KL term to the reference (the `checkpoint.init_from` model, frozen); 0 = no KL term and
    no reference model kept at all (DAPO, Dr. GRPO). R1: 0.001."""
    kl_estimator: str = "k3"
    """k1: log(pi/pi_ref); k2: (log(pi/pi_ref))^2 / 2; k3: pi_ref/pi - log(pi_ref/pi) - 1 (GRPO paper)."""
    loss_aggregation: str = "sequence_mean"
    """`sequence_mean`: each completion's token mean, then the mean over completions (GRPO paper);
    `token_mean`: the mean over every completion token of the batch (DAPO); `constant`: the sum over
    every token divided by completions x `constant_normalizer` (Dr. GRPO)."""
    constant_normalizer: Optional[int] = None
    """The per-completion constant of `constant` aggregation; None = max_new_tokens."""
    scale_advantages: bool = True
    """Divide advantages by the group's reward std (+1e-4); false: only subtract the group mean (Dr. GRPO)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (no signal) and sample more prompts until
    prompts_per_step groups remain, or `max_sampling_rounds` rounds were drawn (then train on what remains)."""
    max_sampling_rounds: int = 4
    """Rounds of prompts_per_step prompts at most per RL step with dynamic_sampling."""
    mask_truncated: bool = False
    """Completions cut at max_new_tokens count no tokens in the loss (DAPO's overlong filtering)."""
    mu: int = 1
    """Optimizer steps per batch of samples; the log-probabilities of the first are kept as pi_old."""
    expert_bias: str = "freeze"
    """The aux-loss-free routing bias during RL: `freeze` (as the start model left it) or `update` (moved by
    train.bias_update_speed after every optimizer step, on the expert loads of the batch, as in pretraining)."""
    router_replay: bool = False
    """Router replay: the sampler records the experts every MoE layer chose for each position of the
    prompts and completions, and every training forward of the step (pi_old, the policy, the reference)
    routes each token to those experts instead of its router's own top-k; the gating weights are still
    the current router's scores of those experts, so the router keeps learning. A routing flip between
    the cached decoder and the full forward then no longer changes the ratio; `routing_drift/*` counts
    the flips replay hides."""
    mtp: str = "off"
    """`off`: the MTP modules are neither run nor updated (kept as they are); `train`: they also learn to
    predict the sampled completions (weight train.mtp_loss_weight), so their drafts follow the policy."""
    system_prompt: Optional[str] = None
    """Text before "User: ..." in every prompt; None = the one the `checkpoint.init_from` run used."""
    eval_problems: int = 64
    """Held-out problems per evaluation (every train.val_every steps, before the first and after the last)."""
    eval_difficulties: list[int] = field(default_factory=list)
    """Difficulty levels of the held-out evaluation; empty = tasks.difficulties."""
    eval_samples: int = 4
    """Samples per held-out problem: pass@1 is their mean accuracy, pass@k (k = eval_samples) is reported too."""
    eval_temperature: float = 0.7
    """Sampling temperature of the evaluation."""


@dataclass
class RejectionConfig:
    """Rejection sampling (launch/rejection_sample.py): `num_samples` completions per problem from
    `checkpoint.init_from`, keep the complete, correct, well-formed, readable, distinct ones, write them
    as SFT data (JSONL for launch/sft.py with sft.source=jsonl)."""

    problems: int = 256
    """Problems drawn from `tasks` (train split)."""
    num_samples: int = 8
    """Samples per problem."""
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    require_correct: bool = True
    """Keep only samples whose answer field is correct (the accuracy reward)."""
    require_format: bool = True
    """Keep only samples exactly in the template (the format reward)."""
    max_repetition: float = 0.2
    """Drop samples whose share of repeated word 3-grams exceeds this (readability); 1 = keep all."""
    max_per_problem: int = 2
    """Distinct kept samples per problem at most (after deduplication)."""
    output: Optional[str] = None
    """None = `<run dir>/traces.jsonl`. The kept samples, {"prompt", "completion", "family", "difficulty",
    "answer"} per line. Beside it,
    `<output stem>.gold.jsonl`: every drawn problem answered with its gold answer alone (no reasoning),
    the baseline of distillation."""

