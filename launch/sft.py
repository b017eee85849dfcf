"""Cold-start SFT (DeepSeek-R1 §2.3.1) of a pretrained checkpoint on prompt/completion pairs in the R1
template, loss on completion tokens only.

    python launch/sft.py +experiment=sft_small checkpoint.init_from=runs/moe_small/checkpoints
    torchrun --nproc_per_node=2 launch/sft.py +experiment=sft_tiny checkpoint.init_from=... parallel=ep2

The architecture comes from `checkpoint.init_from` (a dsv3 checkpoint, a directory of them, or a Hugging
Face DeepseekV3 directory); its tokenizer gets the `sft.special_tokens` (the R1 tags), the embedding and
output head grow to match, and the extended tokenizer is written to `<checkpoint.dir>/tokenizer.json`,
next to the checkpoints, where `launch/generate.py` finds it. Every pretraining plan and option applies.
"""
import dataclasses
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.errors import ConfigError  # noqa: E402
from dsv3.config.store import register, to_config  # noqa: E402
from dsv3.launch_utils import setup_logging, validate_or_exit  # noqa: E402

register()


def prepare(cfg):
    """The base model's architecture with the grown vocabulary, and the extended tokenizer."""
    from dsv3.data.tokenizer import add_special_tokens, load_tokenizer
    from dsv3.train.weights import checkpoint_step, model_config_of, tokenizer_path_of

    c = cfg.checkpoint
    if c.init_from is None:
        raise ConfigError("checkpoint.init_from", None, "must name the pretrained checkpoint SFT starts from")
    try:
        c.init_from = checkpoint_step(c.init_from)
        base = model_config_of(c.init_from)
        tokenizer = load_tokenizer(cfg.sft.tokenizer or tokenizer_path_of(c.init_from))
    except FileNotFoundError as e:
        raise ConfigError("checkpoint.init_from", c.init_from, str(e)) from None
    if tokenizer.get_vocab_size() > base.vocab_size:
        raise ConfigError("sft.tokenizer", cfg.sft.tokenizer, f"has {tokenizer.get_vocab_size()} tokens, more than "
                          f"the model's {base.vocab_size}")
    try:
        add_special_tokens(tokenizer, cfg.sft.special_tokens)
    except ValueError as e:
        raise ConfigError("sft.special_tokens", cfg.sft.special_tokens, str(e)) from None
    grown = max(base.vocab_size, tokenizer.get_vocab_size())
    cfg.model = dataclasses.replace(base, vocab_size=grown, max_seq_len=max(base.max_seq_len, cfg.data.seq_len))
    return tokenizer


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    try:
        tokenizer = prepare(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    validate_or_exit(cfg)
    run_dir = HydraConfig.get().runtime.output_dir
    setup_logging(run_dir)

    from dsv3.parallel.mesh import init_env
    from dsv3.rl.sft import SFTTrainer

    env = init_env(cfg.train.device)
    if env.is_main:
        os.makedirs(cfg.checkpoint.dir, exist_ok=True)
        tokenizer.save(os.path.join(cfg.checkpoint.dir, "tokenizer.json"))
    try:
        SFTTrainer(cfg, run_dir, env, tokenizer).run()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
