"""Rejection sampling (R1 §2.3.3): sample a checkpoint on task problems, keep what the rules accept,
write SFT data.

    python launch/rejection_sample.py +experiment=rejection_arith_tiny \
        checkpoint.init_from=runs/grpo_arith_tiny/checkpoints
    python launch/sft.py +experiment=sft_arith_tiny checkpoint.init_from=BASE sft.source=jsonl \
        sft.path=runs/rejection_arith_tiny/traces.jsonl                         # SFT (or distil) on the kept traces
    torchrun --nproc_per_node=2 launch/rejection_sample.py ...                  # data parallel sampling

`rejection.num_samples` completions for each of `rejection.problems` training problems of `tasks`, in
the template with the system prompt the checkpoint was trained with; kept: complete, correct, in the
template, few repeated 3-grams, distinct, at most `rejection.max_per_problem` per problem
(dsv3/rl/rejection.py). Writes `rejection.output` (JSONL: prompt, completion, family, difficulty,
answer), its gold-answer twin, and a summary line with what was kept and why the rest was dropped.
Invalid settings exit with code 2 and one line naming them.
"""
import json
import os
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.store import register, to_config  # noqa: E402
from dsv3.launch_utils import start_from_checkpoint  # noqa: E402

register()


def prepare(cfg):
    """The start model's architecture and tokenizer; the problems asked exist."""
    from dsv3.rl.config_rules import enough_problems
    from dsv3.rl.start import prepare_from_checkpoint

    tokenizer = prepare_from_checkpoint(cfg)
    enough_problems(cfg, "rejection.problems", "train")
    return tokenizer


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    from dsv3.rl.start import trained_system_prompt

    tokenizer, run_dir = start_from_checkpoint(cfg, prepare)

    import logging

    import torch

    from dsv3.generate import Generator, SamplingParams
    from dsv3.generate.data_parallel import generate_data_parallel
    from dsv3.parallel.mesh import process_env
    from dsv3.rl.rejection import as_json, gold_trace, select
    from dsv3.rl.tasks import mixture
    from dsv3.rl.template import r1_prompt
    from dsv3.train.trainer import build_model
    from dsv3.train.weights import load_initial_weights

    with process_env(cfg.train.device) as env:
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        r, t = cfg.rejection, cfg.tasks
        r.output = r.output or os.path.join(run_dir, "traces.jsonl")
        model = build_model(cfg, env.device)
        load_initial_weights(cfg.checkpoint.init_from, model, cfg.model)
        problems = mixture(t.families, t.difficulties, "train", r.problems, t.seed, t.held_out_fraction)
        system_prompt = trained_system_prompt(cfg.checkpoint.init_from)
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                num_samples=r.num_samples, seed=cfg.train.seed)
        result = generate_data_parallel(Generator(model, tokenizer), [r1_prompt(p.question, system_prompt)
                                                                      for p in problems], params)
        if env.is_main:
            counts: dict = {}
            kept = []
            for i, p in enumerate(problems):
                kept += select(p, result.completions[i * r.num_samples:(i + 1) * r.num_samples], r, counts)
            os.makedirs(os.path.dirname(os.path.abspath(r.output)), exist_ok=True)
            with open(r.output, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(as_json(k)) + "\n" for k in kept)
            gold = os.path.splitext(r.output)[0] + ".gold.jsonl"
            with open(gold, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(as_json(gold_trace(p))) + "\n" for p in problems)
            summary = {"problems": len(problems), "samples": len(result.completions), "kept": len(kept),
                       "problems_with_a_kept_sample": len({k.prompt for k in kept}), "dropped": counts,
                       "sampling_tokens_per_s": round(result.stats["completion_tokens"] / result.stats["seconds"], 1),
                       "output": r.output, "gold": gold}
            logging.getLogger("dsv3").info("rejection sampling: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
