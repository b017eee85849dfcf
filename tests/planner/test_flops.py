"""FLOPs per token against torch.utils.flop_counter on small models, forward and backward, and the
V3-671B numbers the report gives (671B total, 37B activated; the MFU its GPU-hours imply)."""
import os

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.planner.flops import training_flops
from dsv3.planner.report import implied_mfu
from dsv3.planner.shapes import activated_params, model_shape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_config(name: str, **over) -> ModelConfig:
    with open(f"{ROOT}/configs/model/{name}.yaml") as f:
        return ModelConfig(**{**yaml.safe_load(f), **over})


SHAPES = {
    "moe_tiny": {},
    "no q compression, 2 MTP modules, 3 experts per token": dict(q_lora_rank=0, mtp_depth=2, n_activated_experts=3),
    "dense only, no MTP, wide values": dict(n_dense_layers=3, mtp_depth=0, v_head_dim=40),
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("seq", [17, 64])
def test_training_flops_equal_the_flop_counter(name, seq):
    """The counter sees what the ops compute: every query against every key (the math attention
    backend, a dense mask) with values padded to the query width, and the routed experts one GEMM per
    expert (the reference kernel) on the rows really routed; `executed=True` counts the same."""
    cfg = model_config("moe_tiny", **SHAPES[name])
    torch.manual_seed(0)
    model = Transformer(cfg, grouped_gemm="reference")
    init_weights(model, seed=0, std=0.02)
    batch = 3
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        parts = model.losses(tokens[:, :-1], tokens[:, 1:])
        (parts.main + sum(parts.mtp, torch.zeros(()))).backward()
    planned = training_flops(cfg, seq, executed=True).total * batch * seq
    assert abs(planned - counter.get_total_flops()) <= 0.02 * counter.get_total_flops()


def test_gemm_flops_equal_the_counted_matmuls_exactly():
    """The GEMM part alone (projections, FFNs, routed experts, router, head) against the counter's
    aten.mm, which the attention core (aten.bmm under the math backend) does not touch: exact."""
    cfg = model_config("moe_tiny", n_layers=3, mtp_depth=0)
    model = Transformer(cfg, grouped_gemm="reference")
    init_weights(model, seed=0, std=0.02)
    batch, seq = 2, 32
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.losses(tokens[:, :-1], tokens[:, 1:]).main.backward()
    counts = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"aten.mm", "aten.bmm"}
    assert counts["aten.mm"] == pytest.approx(training_flops(cfg, seq).gemm * batch * seq, rel=1e-9)


def test_model_flops_count_causal_attention_and_true_value_width():
    """MFU's FLOPs: a query at position i reads i+1 keys, values of their own width."""
    cfg = model_config("moe_tiny")
    model, executed = training_flops(cfg, 64), training_flops(cfg, 64, executed=True)
    assert model.gemm == executed.gemm
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    expected = 3 * cfg.n_layers * 2 * cfg.n_heads * (qk + cfg.v_head_dim) * (64 + 1) / 2
    assert model.attention == pytest.approx(expected)


def test_v3_671b_has_671b_parameters_and_37b_activated():
    cfg = model_config("deepseek_v3_671b")
    shape = model_shape(cfg)
    assert round(shape.main_params() / 1e9) == 671
    assert int(activated_params(cfg, shape) / 1e9) == 37


def test_v3_mfu_implied_by_the_report_is_stated_in_the_docs():
    """180K H800 GPU-hours per trillion tokens at 4K context (report, Table 1 and §1): the MFU against
    the H800's dense BF16 peak, with and without MTP, as docs/scaling.md states it."""
    cfg = model_config("deepseek_v3_671b")
    flops = training_flops(cfg, 4096)
    mfu = implied_mfu(flops.total, 180e3, 989.4)
    mfu_main = implied_mfu(flops.main, 180e3, 989.4)
    assert 0.3 < mfu_main < mfu < 0.5
    with open(f"{ROOT}/docs/scaling.md") as f:
        doc = f.read()
    assert f"{mfu_main:.1%}" in doc and f"{mfu:.1%}" in doc and f"{flops.main / 1e9:.0f} GFLOPs" in doc
