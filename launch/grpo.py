"""GRPO (DeepSeekMath §4, R1 §2.2) of a checkpoint on verifiable tasks with rule rewards.

    python launch/grpo.py +experiment=grpo_mini checkpoint.init_from=runs/sft_mini/checkpoints
    torchrun --nproc_per_node=2 launch/grpo.py +experiment=grpo_tiny checkpoint.init_from=...   # data parallel

The policy starts from `checkpoint.init_from` (usually a cold-start SFT checkpoint; a base model too, as
R1-Zero); its architecture and tokenizer are the checkpoint's (the R1 tags added if missing), and with
rl.beta > 0 the same weights, frozen, are the reference of the KL term. The prompts are the train split
of `tasks`, the rewards `rewards`, every GRPO/DAPO/Dr. GRPO switch is under `rl` (docs/r1.md). The
extended tokenizer is written next to the checkpoints. Runs data parallel under torchrun; resumes exactly
(train.resume=auto). Invalid settings exit with code 2 and one line naming them.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.errors import ConfigError  # noqa: E402
from dsv3.config.store import register, to_config  # noqa: E402
from dsv3.launch_utils import start_from_checkpoint  # noqa: E402

register()


def prepare(cfg):
    """The start model's architecture and tokenizer; the plan and options GRPO supports."""
    from dsv3.rl.start import prepare_from_checkpoint, trained_system_prompt

    tokenizer = prepare_from_checkpoint(cfg)
    p = cfg.parallel
    if p.ep != 1 or p.pp != 1:
        key, value = ("parallel.ep", p.ep) if p.ep != 1 else ("parallel.pp", p.pp)
        raise ConfigError(key, value, "GRPO runs data parallel only (parallel.ep=1, parallel.pp=1): sampling under "
                          "expert or pipeline parallelism is not supported yet")
    if p.zero != 0 or p.offload_optimizer:
        key, value = ("parallel.zero", p.zero) if p.zero != 0 else ("parallel.offload_optimizer", True)
        raise ConfigError(key, value, "GRPO runs plain data parallel (parallel.zero=0, no optimizer offload): "
                          "its own backward is not wired to ZeRO's gradient reduction yet")
    if cfg.precision.dtype not in ("fp32", "bf16"):
        raise ConfigError("precision.dtype", cfg.precision.dtype, "GRPO runs in fp32 or bf16 (FP8 and fp16 RL are not "
                          "supported yet)")
    if cfg.rl.mtp == "train" and cfg.model.mtp_depth == 0:
        raise ConfigError("rl.mtp", "train", f"the model of {cfg.checkpoint.init_from} has no MTP module")
    from dsv3.rl.config_rules import enough_problems

    enough_problems(cfg, "rl.prompt_pool", "train")
    enough_problems(cfg, "rl.eval_problems", "held_out", cfg.rl.eval_difficulties)
    if cfg.rl.system_prompt is None:
        cfg.rl.system_prompt = trained_system_prompt(cfg.checkpoint.init_from)
    cfg.sft.system_prompt = cfg.rl.system_prompt  # what the policy's checkpoints say they expect
    return tokenizer


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    tokenizer, run_dir = start_from_checkpoint(cfg, prepare)

    from dsv3.parallel.mesh import process_env
    from dsv3.rl.grpo import GRPOTrainer

    with process_env(cfg.train.device) as env:
        GRPOTrainer(cfg, run_dir, env, tokenizer).run()


if __name__ == "__main__":
    main()
