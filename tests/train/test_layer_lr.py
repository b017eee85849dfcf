"""Layer-wise learning rates (optim.layer_lr_decay): which rate each parameter gets, that AdamW applies
it as torch's AdamW would at that rate, and that checkpoints do not change shape."""
import pytest
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.train.optim import AdamW, layer_depth, parameter_groups
from tests.helpers import run_pretrain


def _model() -> Transformer:
    m = Transformer(ModelConfig(n_layers=3, n_dense_layers=1, mtp_depth=1))
    init_weights(m, 0, 0.02)
    return m


def test_rates_fall_by_the_decay_per_layer_from_head_to_embedding():
    m, d = _model(), 0.5
    scale = {id(p): g["lr_scale"] for g in parameter_groups(m, 0.1, d) for p in g["params"]}
    expected = {"embed.weight": d ** 4, "layers.0.attn.wkv_a.weight": d ** 3, "layers.1.ffn.gate.weight": d ** 2,
                "layers.2.attn_norm.weight": d, "norm.weight": 1.0, "head.weight": 1.0, "mtp.0.eh_proj.weight": 1.0}
    named = dict(m.named_parameters())
    for name, value in expected.items():
        assert scale[id(named[name])] == pytest.approx(value), name
    assert len(scale) == sum(1 for p in m.parameters() if p.requires_grad)  # every parameter, once


def test_weight_decay_groups_are_kept_with_layer_rates():
    m = _model()
    decays = {id(p): g["weight_decay"] for g in parameter_groups(m, 0.1, 0.8) for p in g["params"]}
    named = dict(m.named_parameters())
    assert decays[id(named["layers.1.attn.wo.weight"])] == 0.1
    assert decays[id(named["layers.1.attn_norm.weight"])] == 0.0
    assert decays[id(named["embed.weight"])] == 0.0


def test_no_decay_is_the_two_plain_groups():
    groups = parameter_groups(_model(), 0.1, 1.0)
    assert len(groups) == 2 and all("lr_scale" not in g for g in groups)


def test_unknown_parameter_names_are_refused():
    with pytest.raises(ValueError, match="layer-wise"):
        layer_depth("adapter.weight", 3)


def test_adamw_step_equals_torch_adamw_at_the_scaled_rate():
    torch.manual_seed(0)
    a, b, c = (torch.nn.Linear(8, 8) for _ in range(3))
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    ours = AdamW([{"params": [a.weight], "weight_decay": 0.1, "lr_scale": 0.25},
                  {"params": [a.bias], "weight_decay": 0.0, "lr_scale": 0.5}], lr=1e-2)
    ref = torch.optim.AdamW([{"params": [b.weight], "weight_decay": 0.1, "lr": 0.25e-2},
                             {"params": [b.bias], "weight_decay": 0.0, "lr": 0.5e-2}], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(5):
        x = torch.randn(4, 8)
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(a.weight, c.weight)  # it did move
    assert all("lr_scale" not in g for g in ours.state_dict()["param_groups"])  # checkpoints: same keys


def test_config_refuses_a_decay_outside_zero_one(tmp_path):
    r = run_pretrain(str(tmp_path / "run"), "+experiment=moe_tiny", "optim.layer_lr_decay=1.5")
    assert r.returncode == 2
    assert "optim.layer_lr_decay=1.5" in r.stderr


def test_layer_lrs_with_zero_are_refused_naming_both_keys():
    from dsv3.config.errors import ConfigError
    from dsv3.config.rules import World
    from dsv3.config.schema import Config
    from dsv3.parallel.config_rules import zero_rules

    cfg = Config()
    cfg.parallel.zero, cfg.optim.layer_lr_decay = 1, 0.8
    with pytest.raises(ConfigError, match=r"parallel.zero=1: is not supported with optim.layer_lr_decay=0.8"):
        zero_rules(cfg, World(2, 2))
