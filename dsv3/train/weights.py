"""Starting weights for a fresh run: a dsv3 checkpoint or a Hugging Face DeepseekV3 directory.

The weights may have a smaller vocabulary than the run's model (special tokens added to the tokenizer
since, e.g. the R1 template's tags): their embedding and output head are grown (`dsv3.model.vocab`)."""
import dataclasses
import os

import torch
import yaml

from dsv3.config.errors import ConfigError
from dsv3.config.schema import ModelConfig
from dsv3.model.hf_format import from_hf_state_dict, load_hf, model_config_from_hf
from dsv3.model.transformer import Transformer
from dsv3.model.vocab import grow_state_dict
from dsv3.train.checkpoint import describe_damage, load_checkpoint, verify_checkpoint

# Fields that change the weights' shapes or meaning; the rest (seq lengths, init std) may differ.
ARCHITECTURE_FIELDS = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
                       "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                       "n_limited_groups", "score_func", "route_scale", "q_lora_rank", "kv_lora_rank",
                       "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def architecture_differences(ours: ModelConfig, theirs: ModelConfig) -> str:
    """'model.dim 64 vs 32, ...' for every architecture field that differs ('' when none), except that the
    weights may have fewer tokens (they are grown on loading)."""
    return ", ".join(f"model.{n} {getattr(ours, n)!r} vs {getattr(theirs, n)!r}" for n in ARCHITECTURE_FIELDS
                     if getattr(ours, n) != getattr(theirs, n)
                     and not (n == "vocab_size" and theirs.vocab_size < ours.vocab_size))


def load_initial_weights(path: str, model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Load `checkpoint.init_from` (validated: dsv3/train/config_rules.py) into the whole, unsharded model.
    A collective under torch.distributed (the ranks share the checksums of a dsv3 checkpoint)."""
    assert not architecture_differences(cfg, model_config_of(path)), path
    if is_hf_directory(path):
        hf_cfg, tensors = load_hf(path)
        sd = grow_state_dict(from_hf_state_dict(cfg, tensors), cfg.vocab_size)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # HF checkpoints without MTP layers leave our MTP modules at their initialization.
        missing = [k for k in missing if not k.startswith("mtp.")]
        if missing or unexpected:
            raise ValueError(f"{path}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
        return
    problems = verify_checkpoint(path)
    if problems:  # what only the checksums show: validation compared the sizes
        raise ConfigError("checkpoint.init_from", path, describe_damage(path, problems))
    theirs = model_config_of(path)
    if theirs.vocab_size == cfg.vocab_size:
        load_checkpoint(path, model, optimizer=None)
        return
    smaller = Transformer(dataclasses.replace(cfg, vocab_size=theirs.vocab_size))
    load_checkpoint(path, smaller, optimizer=None)
    model.load_state_dict(grow_state_dict(smaller.state_dict(), cfg.vocab_size))


def checkpoint_step(path: str) -> str:
    """A dsv3 step directory or HF directory as given, or the latest step of a checkpoint directory."""
    from dsv3.train.checkpoint import latest_checkpoint

    if is_hf_directory(path) or os.path.isfile(os.path.join(path, "config.yaml")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a dsv3 checkpoint (no config.yaml), a directory of them, "
                                "nor a Hugging Face DeepseekV3 directory (no config.json)")
    return latest


def model_config_of(path: str) -> ModelConfig:
    """The architecture stored with a dsv3 checkpoint or an HF directory."""
    import json

    if is_hf_directory(path):
        with open(os.path.join(path, "config.json")) as f:
            return model_config_from_hf(json.load(f))
    with open(os.path.join(path, "config.yaml")) as f:
        return ModelConfig(**yaml.safe_load(f)["model"])


def tokenizer_path_of(path: str) -> str:
    """The tokenizer.json a checkpoint was trained with: one next to it (in the step directory or the
    checkpoint directory above it, where fine-tuning runs write theirs), else the tokenizer of the data
    its run was configured with (the embedded corpus' cache or a prepared shard directory)."""
    beside = [path, os.path.dirname(path.rstrip("/"))]
    for candidate in (os.path.join(d, "tokenizer.json") for d in beside):
        if os.path.isfile(candidate):
            return candidate
    config = os.path.join(path, "config.yaml")
    if os.path.isfile(config):
        from dsv3.config.schema import DataConfig
        from dsv3.data import shard_directory

        with open(config) as f:
            saved = yaml.safe_load(f)
        data = DataConfig(**saved.get("data", {}))
        candidate = os.path.join(shard_directory(data, saved["model"]["vocab_size"]), "tokenizer.json")
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no tokenizer.json found for {path}; pass one explicitly")
