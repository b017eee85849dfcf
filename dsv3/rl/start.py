"""What every post-training run starts from: the architecture and tokenizer of `checkpoint.init_from`
(a dsv3 checkpoint, a directory of them, or a Hugging Face DeepseekV3 directory), the tokenizer grown by
the R1 template's special tokens (`sft.special_tokens`), the model's vocabulary grown to match, and the
system prompt the start model was trained with."""
import dataclasses
import os

import yaml

from dsv3.config.errors import ConfigError
from dsv3.config.schema import Config
from dsv3.rl.template import R1_SYSTEM_PROMPT


def prepare_from_checkpoint(cfg: Config, min_context: int = 0):
    """Sets cfg.model (the start model's architecture, its vocabulary grown, its context at least
    `min_context`) and resolves checkpoint.init_from to one step; returns the extended tokenizer."""
    from dsv3.data.tokenizer import add_special_tokens, load_tokenizer
    from dsv3.train.weights import checkpoint_step, model_config_of, tokenizer_path_of

    c = cfg.checkpoint
    if c.init_from is None:
        raise ConfigError("checkpoint.init_from", None, "must name the checkpoint this run starts from")
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
    cfg.model = dataclasses.replace(base, vocab_size=grown, max_seq_len=max(base.max_seq_len, min_context))
    return tokenizer


def trained_system_prompt(path: str) -> str:
    """The system prompt a checkpoint's model was fine-tuned with (`sft.system_prompt` of its run, which
    GRPO runs also set); R1's for a Hugging Face directory or a run without one."""
    config = os.path.join(path, "config.yaml")
    if not os.path.isfile(config):
        return R1_SYSTEM_PROMPT
    with open(config) as f:
        saved = yaml.safe_load(f)
    prompt = (saved.get("sft") or {}).get("system_prompt")
    return R1_SYSTEM_PROMPT if prompt is None else prompt
