"""Cold-start SFT (DeepSeek-R1 §2.3.1) of a pretrained checkpoint on prompt/completion pairs in the R1
template, loss on completion tokens only.

    python launch/sft.py +experiment=sft_small checkpoint.init_from=runs/moe_small/checkpoints
    torchrun --nproc_per_node=2 launch/sft.py +experiment=sft_tiny checkpoint.init_from=... parallel=ep2

The architecture comes from `checkpoint.init_from` (a dsv3 checkpoint, a directory of them, or a Hugging
Face DeepseekV3 directory); its tokenizer gets the `sft.special_tokens` (the R1 tags), the embedding and
output head grow to match, and the extended tokenizer is written to `<checkpoint.dir>/tokenizer.json`,
next to the checkpoints, where `launch/generate.py` finds it. Every pretraining plan and option applies.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.store import register, to_config  # noqa: E402
from dsv3.launch_utils import start_from_checkpoint  # noqa: E402

register()


def prepare(cfg):
    """The base model's architecture with the grown vocabulary, and the extended tokenizer."""
    from dsv3.rl.config_rules import enough_problems
    from dsv3.rl.start import prepare_from_checkpoint

    tokenizer = prepare_from_checkpoint(cfg, min_context=cfg.data.seq_len)
    if cfg.sft.source == "tasks":
        enough_problems(cfg, "sft.examples", "train")
        enough_problems(cfg, "sft.val_examples", "held_out")
    return tokenizer


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    tokenizer, run_dir = start_from_checkpoint(cfg, prepare)

    from dsv3.parallel.mesh import process_env
    from dsv3.rl.sft import SFTTrainer

    with process_env(cfg.train.device) as env:
        if env.is_main:
            os.makedirs(cfg.checkpoint.dir, exist_ok=True)
            tokenizer.save(os.path.join(cfg.checkpoint.dir, "tokenizer.json"))
        SFTTrainer(cfg, run_dir, env, tokenizer).run()


if __name__ == "__main__":
    main()
