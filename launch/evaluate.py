"""Held-out accuracy of a checkpoint on task problems: pass@1 and pass@k (k = rl.eval_samples, the unbiased
estimator), format compliance and length, overall and per family, with the standard error of pass@1.

    python launch/evaluate.py +experiment=grpo_arith_small checkpoint.init_from=runs/sft_arith_small/checkpoints
    torchrun --nproc_per_node=2 launch/evaluate.py ...                                   # data parallel sampling

The problems are the held-out split of `tasks.families` at `rl.eval_difficulties` (empty: `tasks.difficulties`),
`rl.eval_problems` of them, exactly those a GRPO run with the same settings evaluates on: never a training
problem. `rl.eval_samples` samples each at `rl.eval_temperature`, at most `rl.max_new_tokens` tokens, in the
template with the system prompt the checkpoint was trained with, seeded by `train.seed`. Writes
`<run dir>/eval.json` and prints one line of it. Invalid settings exit with code 2 and one line naming them.
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


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    from dsv3.rl.start import prepare_from_checkpoint, trained_system_prompt

    tokenizer, run_dir = start_from_checkpoint(cfg, prepare_from_checkpoint)

    import logging

    import torch
    import torch.distributed as dist

    from dsv3.generate import Generator, SamplingParams
    from dsv3.parallel.mesh import init_env
    from dsv3.rl.evaluate import evaluate
    from dsv3.rl.tasks import mixture
    from dsv3.train.trainer import build_model
    from dsv3.train.weights import load_initial_weights

    env = init_env(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    r, t = cfg.rl, cfg.tasks
    model = build_model(cfg, env.device)
    load_initial_weights(cfg.checkpoint.init_from, model, cfg.model)
    model.eval()
    problems = mixture(t.families, r.eval_difficulties or t.difficulties, "held_out", r.eval_problems, t.seed,
                       t.held_out_fraction)
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.eval_temperature,
                            num_samples=r.eval_samples, seed=cfg.train.seed)
    ks = (1, r.eval_samples) if r.eval_samples > 1 else (1,)
    with torch.no_grad():
        result = evaluate(Generator(model, tokenizer), problems, params,
                          trained_system_prompt(cfg.checkpoint.init_from), ks)
    if env.is_main:
        result.update(checkpoint=cfg.checkpoint.init_from, difficulties=list(r.eval_difficulties or t.difficulties),
                      families=list(t.families), temperature=r.eval_temperature)
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        logging.getLogger("dsv3").info("evaluation: %s", json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
