"""Adapters between our state dict and Hugging Face's DeepseekV3 format (config.json + safetensors).

HF's `save_pretrained` writes the routed experts per expert (`mlp.experts.{e}.gate_proj.weight`, ...);
we hold them as 3-D tensors (`experts.w13` = [gate; up], `experts.w2`). MTP modules are written as
`model.layers.{n_layers + k}.*` with `enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}` and
`embed_tokens`, as in DeepSeek's released checkpoints; HF's model ignores them.
RoPE needs no weight permutation: HF's `rope_interleave=True` rotates the same interleaved pairs.
"""
import json
import os
import re

import torch

from dsv3.config.schema import ModelConfig
from dsv3.model.rope import yarn_enabled

# Our key inside one transformer block -> HF's inside one decoder layer, for every non-expert weight.
# Written once; the import reads it backwards. (Routed experts are 3-D here, per expert in HF: below.)
_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
BLOCK_KEYS = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
              **{f"attn.{a}.weight": f"self_attn.{b}.weight" for a, b in _ATTN.items()},
              **{f"ffn.{a}.weight": f"mlp.{b}.weight" for a, b in _FFN.items()},
              **{f"ffn.shared_experts.{a}.weight": f"mlp.shared_experts.{b}.weight" for a, b in _FFN.items()},
              "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias"}
# The whole model's own weights, and an MTP module's besides its block (`model.layers.{n_layers + k}.*`;
# the MTP copies of the embedding and the head are written too, and read back from the model's own).
MODEL_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"}
MTP_KEYS = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "norm.weight": "shared_head.norm.weight"}
_EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _inverse(keys: dict[str, str]) -> dict[str, str]:
    return {theirs: ours for ours, theirs in keys.items()}


def export_problems(cfg: ModelConfig) -> list[str]:
    """Why `cfg` has no equivalent DeepseekV3ForCausalLM (empty: it has one)."""
    problems = []
    if cfg.score_func != "sigmoid":
        problems.append(f"model.score_func={cfg.score_func!r}: HF's DeepseekV3 only has sigmoid routing")
    return problems


def hf_config(cfg: ModelConfig, **extra) -> dict:
    """The config.json of a DeepseekV3ForCausalLM equivalent to `cfg`."""
    problems = export_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    if yarn_enabled(cfg):
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.route_scale, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "num_experts_per_tok": cfg.n_activated_experts, "first_k_dense_replace": cfg.n_dense_layers,
        "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std, "tie_word_embeddings": False,
        "rope_interleave": True, "rope_parameters": rope, "num_nextn_predict_layers": cfg.mtp_depth,
        "attention_bias": False, "torch_dtype": "float32", **extra,
    }


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """Our ModelConfig from an HF DeepseekV3 config.json dict."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
        moe_inter_dim=hf["moe_intermediate_size"], n_layers=hf["num_hidden_layers"],
        n_dense_layers=hf.get("first_k_dense_replace", 0), n_heads=hf["num_attention_heads"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf["num_experts_per_tok"], n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1, score_func="sigmoid",
        route_scale=hf.get("routed_scaling_factor", 1.0), q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        max_seq_len=hf["max_position_embeddings"], rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6), mtp_depth=hf.get("num_nextn_predict_layers", 0),
        init_std=hf.get("initializer_range", 0.006),
    )
    if rope_type == "yarn":
        fields.update(original_seq_len=rope["original_max_position_embeddings"], rope_factor=rope["factor"],
                      beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
                      mscale=rope.get("mscale_all_dim", rope.get("mscale", 1.0)))
    else:
        # No YaRN: make sure ours does not switch it on either.
        fields.update(original_seq_len=hf["max_position_embeddings"])
    fields.update(overrides)
    return ModelConfig(**fields)


def _expert_tensors_to_hf(prefix: str, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for e in range(w.shape[0]):
        if name == "w13":
            gate, up = w[e].chunk(2, dim=0)
            out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate
            out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up
        else:
            out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = w[e]
    return out


def _block_to_hf_dict(prefix: str, block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in block.items():
        if key.startswith("ffn.experts."):
            out.update(_expert_tensors_to_hf(prefix, key.rsplit(".", 1)[1], t))
        else:
            out[prefix + BLOCK_KEYS[key]] = t
    return out


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full (unsharded) state dict -> HF DeepseekV3ForCausalLM keys, MTP as model.layers.{n_layers+k}."""
    out = {theirs: sd[ours] for ours, theirs in MODEL_KEYS.items()}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out.update(_block_to_hf_dict(f"model.layers.{i}.", {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}))
    for k in range(cfg.mtp_depth):
        p, q = f"mtp.{k}.", f"model.layers.{cfg.n_layers + k}."
        block = {key[len(p + "block."):]: v for key, v in sd.items() if key.startswith(p + "block.")}
        out.update(_block_to_hf_dict(q, block))
        out.update({q + theirs: sd[p + ours] for ours, theirs in MTP_KEYS.items()})
        out.update({q + "shared_head.head.weight": sd["head.weight"], q + "embed_tokens.weight": sd["embed.weight"]})
    # safetensors refuses tensors that share memory (the MTP copies of embedding and head, expert halves).
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _hf_block_to_ours_dict(block: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    ours, out, experts = _inverse(BLOCK_KEYS), {}, {}
    for key, t in block.items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts[(int(m.group(1)), m.group(2))] = t
        else:
            out[ours[key]] = t
    if experts:
        out["ffn.experts.w13"] = torch.stack([torch.cat([experts[(e, "gate_proj")], experts[(e, "up_proj")]])
                                              for e in range(n_experts)])
        out["ffn.experts.w2"] = torch.stack([experts[(e, "down_proj")] for e in range(n_experts)])
    return out


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys (with or without MTP layers) -> our state dict. MTP weights missing from `hf` stay missing."""
    sd = {ours: hf[theirs] for ours, theirs in MODEL_KEYS.items()}
    mtp_own = _inverse(MTP_KEYS)
    for i in range(cfg.n_layers + cfg.mtp_depth):
        p = f"model.layers.{i}."
        block = {k[len(p):]: v for k, v in hf.items() if k.startswith(p)}
        if i < cfg.n_layers:
            sd.update({f"layers.{i}.{k}": v for k, v in _hf_block_to_ours_dict(block, cfg.n_routed_experts).items()})
        elif block:
            q = f"mtp.{i - cfg.n_layers}."
            copies = ("shared_head.head.weight", "embed_tokens.weight")  # the model's own embedding and head
            body = {k: v for k, v in block.items() if k not in mtp_own and k not in copies}
            sd.update({q + "block." + k: v for k, v in _hf_block_to_ours_dict(body, cfg.n_routed_experts).items()})
            sd.update({q + mtp_own[theirs]: block[theirs] for theirs in mtp_own})
    return sd


def save_hf(out_dir: str, cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
            max_shard_bytes: int = 5 * 2**30, **config_extra) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
               for k, v in to_hf_state_dict(cfg, sd).items()}
    shards, current, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = tensors[k]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, **{"torch_dtype": dtype_name, **config_extra}), f, indent=2)


def read_hf_config(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def load_hf(hf_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, all tensors) of an HF directory, single-file or sharded."""
    from safetensors.torch import load_file

    config = read_hf_config(hf_dir)
    files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(hf_dir, name)))
    return config, tensors
