"""Starting weights for a fresh run: a dsv3 checkpoint or a Hugging Face DeepseekV3 directory."""
import dataclasses
import os

import torch
import yaml

from dsv3.config.errors import ConfigError
from dsv3.config.schema import ModelConfig
from dsv3.model.hf_format import from_hf_state_dict, load_hf, model_config_from_hf, read_hf_config
from dsv3.train.checkpoint import describe_damage, load_checkpoint, verify_checkpoint

# Fields that change the weights' shapes or meaning; the rest (seq lengths, init std) may differ.
ARCHITECTURE_FIELDS = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
                       "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                       "n_limited_groups", "score_func", "route_scale", "q_lora_rank", "kv_lora_rank",
                       "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def saved_model_config(path: str, ours: ModelConfig) -> ModelConfig:
    """The model config of the weights in `path` (fields a dsv3 checkpoint did not save: `ours`)."""
    if is_hf_directory(path):
        return model_config_from_hf(read_hf_config(path))
    with open(os.path.join(path, "config.yaml")) as f:
        return dataclasses.replace(ours, **yaml.safe_load(f)["model"])


def architecture_differences(ours: ModelConfig, theirs: ModelConfig) -> str:
    """'model.dim 64 vs 32, ...' for every architecture field that differs ('' when none)."""
    return ", ".join(f"model.{n} {getattr(ours, n)!r} vs {getattr(theirs, n)!r}" for n in ARCHITECTURE_FIELDS
                     if getattr(ours, n) != getattr(theirs, n))


def load_initial_weights(path: str, model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Load `checkpoint.init_from` (validated: dsv3/train/config_rules.py) into the whole, unsharded model.
    A collective under torch.distributed (the ranks share the checksums of a dsv3 checkpoint)."""
    assert not architecture_differences(cfg, saved_model_config(path, cfg)), path
    if is_hf_directory(path):
        hf_cfg, tensors = load_hf(path)
        sd = from_hf_state_dict(cfg, tensors)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # HF checkpoints without MTP layers leave our MTP modules at their initialization.
        missing = [k for k in missing if not k.startswith("mtp.")]
        if missing or unexpected:
            raise ValueError(f"{path}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
        return
    problems = verify_checkpoint(path)
    if problems:  # what only the checksums show: validation compared the sizes
        raise ConfigError("checkpoint.init_from", path, describe_damage(path, problems))
    load_checkpoint(path, model, optimizer=None)
