"""Accuracy of a model on task problems: sample G completions per problem in the R1 template, score the
answer field, report pass@1 and pass@k (the unbiased estimator of Chen et al. 2021 from G samples),
format compliance and completion length, overall and per family; the standard error of each pass@k over
problems."""
from collections import defaultdict
from math import comb

from dsv3.generate import Generator, SamplingParams
from dsv3.generate.data_parallel import generate_data_parallel
from dsv3.rl.rewards import Rollout, accuracy, format_reward
from dsv3.rl.tasks import Problem
from dsv3.rl.template import R1_SYSTEM_PROMPT, r1_prompt


def pass_at_k(n: int, correct: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct)."""
    return 1.0 if n - correct < k else 1.0 - comb(n - correct, k) / comb(n, k)


def evaluate(generator: Generator, problems: list[Problem], params: SamplingParams,
             system_prompt: str = R1_SYSTEM_PROMPT, ks: tuple[int, ...] = (1,)) -> dict:
    if any(k > params.num_samples for k in ks):
        raise ValueError(f"pass@{max(ks)} needs num_samples >= {max(ks)}, got {params.num_samples}")
    result = generate_data_parallel(generator, [r1_prompt(p.question, system_prompt) for p in problems], params)
    correct, fmt, lengths = defaultdict(int), [], []
    for c in result.completions:
        r = Rollout(c.text, problems[c.prompt_index], len(c.tokens), c.finish_reason == "length")
        correct[c.prompt_index] += int(accuracy(r))
        fmt.append(format_reward(r))
        lengths.append(len(c.tokens))
    G = params.num_samples
    out = {f"pass@{k}": sum(pass_at_k(G, correct[i], k) for i in range(len(problems))) / len(problems) for k in ks}
    for k in ks:  # the standard error over problems (the samples of one problem are not independent draws)
        per = [pass_at_k(G, correct[i], k) for i in range(len(problems))]
        var = sum((x - out[f"pass@{k}"]) ** 2 for x in per) / max(len(per) - 1, 1)
        out[f"stderr/pass@{k}"] = (var / len(per)) ** 0.5
    out.update(format=sum(fmt) / len(fmt), mean_length=sum(lengths) / len(lengths), problems=len(problems),
               samples=G)
    families = sorted({p.family for p in problems})
    for f in families:
        idx = [i for i, p in enumerate(problems) if p.family == f]
        out[f"pass@1/{f}"] = sum(correct[i] for i in idx) / (G * len(idx))
    return out


def prepare_evaluation(cfg):
    """What an evaluation does before loading weights: dsv3.rl.start.prepare_from_checkpoint (the config
    completed from the checkpoint; returns the tokenizer), then the check that the held-out problems it
    asks for exist (a ConfigError naming rl.eval_problems otherwise)."""
    from dsv3.rl.config_rules import enough_problems
    from dsv3.rl.start import prepare_from_checkpoint

    tokenizer = prepare_from_checkpoint(cfg)
    enough_problems(cfg, "rl.eval_problems", "held_out", cfg.rl.eval_difficulties)
    return tokenizer


def evaluate_checkpoint(cfg, tokenizer, device) -> dict:
    """Held-out accuracy of the checkpoint `cfg.checkpoint.init_from` (cfg and `tokenizer` as
    prepare_evaluation left them): `rl.eval_problems` problems of the held-out split of
    `tasks.families` at `rl.eval_difficulties` (empty: `tasks.difficulties`), those a GRPO run with the same
    settings evaluates on; `rl.eval_samples` samples each at `rl.eval_temperature`, seeded by `train.seed`,
    in the template with the system prompt the checkpoint was trained with. Data parallel under torchrun."""
    import torch

    from dsv3.rl.start import trained_system_prompt
    from dsv3.rl.tasks import mixture
    from dsv3.train.trainer import build_model
    from dsv3.train.weights import load_initial_weights

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    r, t = cfg.rl, cfg.tasks
    model = build_model(cfg, device)
    load_initial_weights(cfg.checkpoint.init_from, model, cfg.model)
    model.eval()
    difficulties = list(r.eval_difficulties or t.difficulties)
    problems = mixture(t.families, difficulties, "held_out", r.eval_problems, t.seed, t.held_out_fraction)
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.eval_temperature,
                            num_samples=r.eval_samples, seed=cfg.train.seed)
    ks = (1, r.eval_samples) if r.eval_samples > 1 else (1,)
    with torch.no_grad():
        result = evaluate(Generator(model, tokenizer), problems, params, trained_system_prompt(cfg.checkpoint.init_from),
                          ks)
    result.update(checkpoint=cfg.checkpoint.init_from, difficulties=difficulties, families=list(t.families),
                  temperature=r.eval_temperature)
    return result
