"""Initialization depends on the global parameter name and expert index only, never on the plan."""
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.model.moe import Experts

CFG = ModelConfig(n_layers=3, n_dense_layers=1, n_routed_experts=8)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = Transformer(CFG), Transformer(CFG), Transformer(CFG)
    init_weights(a, 1, 0.006)
    init_weights(b, 1, 0.006)
    init_weights(c, 2, 0.006)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim > 1:
            assert not torch.equal(pa, pc), name


def test_a_slice_of_experts_gets_the_values_the_full_model_has():
    full = Experts(8, 16, 8)
    full_model = torch.nn.ModuleDict({"experts": full})
    init_weights(full_model, 5, 0.006)
    half = Experts(4, 16, 8)
    half.expert_offset = 4  # what an expert-parallel rank holding experts 4..7 sets
    init_weights(torch.nn.ModuleDict({"experts": half}), 5, 0.006)
    assert torch.equal(half.w13, full.w13[4:]) and torch.equal(half.w2, full.w2[4:])


def test_a_pipeline_stage_gets_the_values_the_full_model_has():
    full = Transformer(CFG)
    init_weights(full, 3, 0.006)
    stage = torch.nn.Module()
    stage.layers = torch.nn.ModuleDict({"2": full.layers["2"].__class__(2, CFG)})
    init_weights(stage, 3, 0.006)
    for name, p in stage.named_parameters():
        assert torch.equal(p, full.get_parameter(name)), name


def test_std_is_the_configured_one_and_norms_are_one():
    m = Transformer(ModelConfig(dim=256, n_layers=2))
    init_weights(m, 0, 0.006)
    assert abs(m.embed.weight.std().item() - 0.006) < 3e-4
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
