"""The shipped model configs describe the published models exactly: their parameter counts match the
reports (counted on the meta device, nothing allocated) and they pass validation."""
import os

import pytest
import torch
import yaml

from dsv3.config.schema import ModelConfig
from dsv3.model.config_rules import check_model
from dsv3.model import Transformer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model")


def load(name: str) -> ModelConfig:
    with open(os.path.join(CONFIGS, f"{name}.yaml")) as f:
        return ModelConfig(**yaml.safe_load(f))


def counts(cfg: ModelConfig) -> tuple[float, float]:
    """(total parameters of the main model, activated parameters per token without the input embedding)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    main = {n: p.numel() for n, p in model.named_parameters() if not n.startswith("mtp.")}
    routed = sum(v for n, v in main.items() if ".experts." in n)
    n_moe = cfg.n_layers - cfg.n_dense_layers
    active = (sum(main.values()) - routed - main["embed.weight"]
              + n_moe * cfg.n_activated_experts * 3 * cfg.dim * cfg.moe_inter_dim)
    return sum(main.values()) / 1e9, active / 1e9


@pytest.mark.parametrize("name,total,active,tol", [
    ("deepseek_v3_671b", 671.0, 37.0, 0.05),   # V3 report: 671B total, 37B activated
    ("deepseek_16b", 15.7, 2.4, 0.05),         # DeepSeek-V2-Lite: 15.7B total, 2.4B activated
    ("moe_rtx", 0.70, 0.18, 0.02),             # ours, for one 24 GB card: what its header promises
])
def test_parameter_counts_match_the_reports(name, total, active, tol):
    got_total, got_active = counts(load(name))
    assert abs(got_total - total) < 0.01 * total, got_total
    assert abs(got_active - active) < tol * active, got_active


@pytest.mark.parametrize("name", ["deepseek_v3_671b", "deepseek_16b", "moe_small", "moe_tiny"])
def test_shipped_model_configs_are_valid(name):
    check_model(load(name))


def test_the_671b_config_is_the_v3_architecture():
    cfg = load("deepseek_v3_671b")
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_routed_experts, cfg.n_activated_experts) == (61, 7168, 128, 256, 8)
    assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale, cfg.score_func) == (8, 4, 2.5, "sigmoid")
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.mtp_depth, cfg.init_std) == (1536, 512, 64, 1, 0.006)
