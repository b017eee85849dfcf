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
    from dsv3.rl.evaluate import prepare_evaluation

    tokenizer, run_dir = start_from_checkpoint(cfg, prepare_evaluation)

    import logging

    from dsv3.parallel.mesh import process_env
    from dsv3.rl.evaluate import evaluate_checkpoint

    with process_env(cfg.train.device) as env:
        result = evaluate_checkpoint(cfg, tokenizer, env.device)
    if env.is_main:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        logging.getLogger("dsv3").info("evaluation: %s", json.dumps(result))


if __name__ == "__main__":
    main()
