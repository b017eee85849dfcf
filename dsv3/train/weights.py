"""Starting weights for a fresh run: a dsv3 checkpoint or a Hugging Face DeepseekV3 directory."""
import dataclasses
import os

import torch
import yaml

from dsv3.config.schema import ModelConfig
from dsv3.model.hf_format import from_hf_state_dict, load_hf, model_config_from_hf
from dsv3.config.errors import ConfigError
from dsv3.train.checkpoint import describe_damage, load_checkpoint, verify_checkpoint

# Fields that change the weights' shapes or meaning; the rest (seq lengths, init std) may differ.
ARCHITECTURE_FIELDS = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
                       "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                       "n_limited_groups", "score_func", "route_scale", "q_lora_rank", "kv_lora_rank",
                       "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def check_same_architecture(ours: ModelConfig, theirs: ModelConfig, source: str) -> None:
    for name in ARCHITECTURE_FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        if a != b:
            raise ValueError(f"checkpoint.init_from={source}: model.{name}={a!r} but the weights have {b!r}")


def load_initial_weights(path: str, model: torch.nn.Module, cfg: ModelConfig) -> None:
    if is_hf_directory(path):
        hf_cfg, tensors = load_hf(path)
        check_same_architecture(cfg, model_config_from_hf(hf_cfg), path)
        sd = from_hf_state_dict(cfg, tensors)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # HF checkpoints without MTP layers leave our MTP modules at their initialization.
        missing = [k for k in missing if not k.startswith("mtp.")]
        if missing or unexpected:
            raise ValueError(f"{path}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
        return
    problems = verify_checkpoint(path)
    if problems:
        raise ConfigError("checkpoint.init_from", path, describe_damage(path, problems))
    with open(os.path.join(path, "config.yaml")) as f:
        saved = yaml.safe_load(f)["model"]
    check_same_architecture(cfg, dataclasses.replace(cfg, **saved), path)
    load_checkpoint(path, model, optimizer=None)
