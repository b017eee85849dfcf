"""Config rules of post-training (`tasks.*`, `rewards`, `sft.*`, `rl.*`, `rejection.*`), registered in
dsv3/config/rules.py."""
import os

from dsv3.config.errors import ConfigError
from dsv3.config.post_training import KL_ESTIMATORS, LOSS_AGGREGATIONS
from dsv3.config.rules import World, one_of, require
from dsv3.config.schema import Config
from dsv3.rl.tasks import FAMILIES, MAX_DIFFICULTY, NotEnoughProblems, mixture


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


def grpo_rules(cfg: Config, world: World) -> None:
    """rl.*: GRPO and its DAPO / Dr. GRPO switches (launch/grpo.py)."""
    r = cfg.rl
    require(r.num_generations >= 2, "rl.num_generations", r.num_generations, "must be >= 2 (a group needs two samples)")
    for key in ("prompts_per_step", "prompt_pool", "max_new_tokens", "mu", "max_sampling_rounds", "eval_problems",
                "eval_samples"):
        require(getattr(r, key) >= 1, f"rl.{key}", getattr(r, key), "must be >= 1")
    require(r.temperature > 0, "rl.temperature", r.temperature, "must be > 0 (GRPO samples; greedy has no groups)")
    require(0 < r.top_p <= 1, "rl.top_p", r.top_p, "must be in (0, 1] (1 = off)")
    require(r.top_k >= 0, "rl.top_k", r.top_k, "must be >= 0 (0 = off)")
    require(0 <= r.epsilon < 1, "rl.epsilon", r.epsilon, "must be in [0, 1)")
    require(r.epsilon_high >= 0, "rl.epsilon_high", r.epsilon_high, "must be >= 0")
    require(r.beta >= 0, "rl.beta", r.beta, "must be >= 0 (0 = no KL term, no reference model)")
    one_of("rl.kl_estimator", r.kl_estimator, KL_ESTIMATORS)
    one_of("rl.loss_aggregation", r.loss_aggregation, LOSS_AGGREGATIONS)
    require(r.constant_normalizer is None or r.constant_normalizer >= 1, "rl.constant_normalizer",
            r.constant_normalizer, "must be >= 1, or null (= rl.max_new_tokens)")
    one_of("rl.expert_bias", r.expert_bias, ("freeze", "update"))
    one_of("rl.mtp", r.mtp, ("off", "train"))
    require(not r.router_replay or cfg.model.n_dense_layers < cfg.model.n_layers, "rl.router_replay", r.router_replay,
            f"needs MoE layers, but every layer of the model is dense (model.n_dense_layers="
            f"{cfg.model.n_dense_layers} >= model.n_layers={cfg.model.n_layers}); use rl.router_replay=false")
    require(r.eval_temperature >= 0, "rl.eval_temperature", r.eval_temperature, "must be >= 0 (0 = greedy)")
    require(all(1 <= d <= MAX_DIFFICULTY for d in r.eval_difficulties), "rl.eval_difficulties", r.eval_difficulties,
            f"must be levels in 1..{MAX_DIFFICULTY} (empty = tasks.difficulties)")


def rejection_rules(cfg: Config, world: World) -> None:
    """rejection.*: rejection sampling (launch/rejection_sample.py)."""
    r = cfg.rejection
    for key in ("problems", "num_samples", "max_new_tokens", "max_per_problem"):
        require(getattr(r, key) >= 1, f"rejection.{key}", getattr(r, key), "must be >= 1")
    require(r.temperature > 0, "rejection.temperature", r.temperature,
            "must be > 0 (several distinct samples are drawn)")
    require(0 < r.top_p <= 1, "rejection.top_p", r.top_p, "must be in (0, 1] (1 = off)")
    require(0 <= r.max_repetition <= 1, "rejection.max_repetition", r.max_repetition,
            "must be in [0, 1] (1 = keep all)")


def enough_problems(cfg: Config, key: str, split: str, difficulties: list[int] | None = None) -> None:
    """The launcher's check that `tasks` holds the `key` problems it will draw from `split` (generating
    them, so not one of the RULES every config runs: GRPO, rejection sampling and SFT call it first)."""
    t, n = cfg.tasks, _get(cfg, key)
    levels = difficulties or t.difficulties
    if (not t.families or any(f not in FAMILIES for f in t.families) or not levels
            or any(not 1 <= d <= MAX_DIFFICULTY for d in levels) or not 0 < t.held_out_fraction < 1 or n < 1):
        return  # the RULES name these keys (the launcher validates right after)
    try:
        mixture(t.families, levels, split, n, t.seed, t.held_out_fraction)
    except NotEnoughProblems as e:
        share = -(-n // (len(t.families) * len(levels)))
        levels_key = "rl.eval_difficulties" if difficulties else "tasks.difficulties"
        raise ConfigError(key, n, f"asks {share} {split} problems of {e.family} at difficulty {e.difficulty} "
                          f"(an equal share per family and difficulty), but only {e.found} exist: ask for fewer, "
                          f"or add harder difficulties ({levels_key}) or families (tasks.families)") from None


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


RULES = (post_training_rules, grpo_rules, rejection_rules)
