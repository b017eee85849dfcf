"""convert_to_fp8: which modules become FP8, which stay high precision, and that nothing a checkpoint or
the HF export sees changes (same Parameter objects, names and shapes)."""
import pytest
import torch
from torch import nn

from dsv3.config.schema import Fp8Config, ModelConfig
from dsv3.fp8 import Fp8Experts, Fp8FeedForward, Fp8Linear, convert_to_fp8
from dsv3.model import Transformer, init_weights
from dsv3.model.hf_format import to_hf_state_dict
from dsv3.model.moe import Gate
from dsv3.model.norm import RMSNorm

CFG = ModelConfig(vocab_size=128, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
                  n_routed_experts=4, n_activated_experts=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, mtp_depth=1)


def model():
    m = Transformer(CFG)
    init_weights(m, seed=0, std=0.02)
    return m


def test_every_projection_ffn_and_expert_group_is_fp8_the_rest_untouched():
    m = model()
    params = dict(m.named_parameters())
    summary = convert_to_fp8(m, Fp8Config(), "reference")
    linears = {n for n, mod in m.named_modules() if isinstance(mod, Fp8Linear)}
    # MLA: wq_a, wq_b, wkv_a, wkv_b, wo in 2 layers + the MTP block; the MTP projection.
    expected = {f"{p}.attn.{w}" for p in ("layers.0", "layers.1", "mtp.0.block")
                for w in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo")} | {"mtp.0.eh_proj"}
    assert linears == expected == set(summary.linears)
    assert {n for n, mod in m.named_modules() if isinstance(mod, Fp8FeedForward)} == {
        "layers.0.ffn", "layers.1.ffn.shared_experts", "mtp.0.block.ffn.shared_experts"}
    assert {n for n, mod in m.named_modules() if isinstance(mod, Fp8Experts)} == {
        "layers.1.ffn.experts", "mtp.0.block.ffn.experts"}
    ffns = tuple(n + "." for n, mod in m.named_modules() if isinstance(mod, Fp8FeedForward))
    # The output head stays; an FP8 FFN's w1/w2/w3 only hold its weights (its fused SwiGLU runs them).
    assert [n for n, mod in m.named_modules() if type(mod) is nn.Linear and not n.startswith(ffns)] == ["head"]
    assert type(m.embed) is nn.Embedding
    assert all(type(mod) in (Gate, RMSNorm) for mod in m.modules() if isinstance(mod, (Gate, RMSNorm)))
    assert m.layers["0"].attn.wo.role == "attn_out" and m.layers["0"].attn.wq_a.role == "linear_in"
    after = dict(m.named_parameters())
    assert list(after) == list(params) and all(after[n] is params[n] for n in params)
    assert "EMULATED on cpu" in str(summary)


def test_state_dict_and_hf_export_are_unchanged():
    reference, converted = model(), model()
    convert_to_fp8(converted, Fp8Config(), "reference")
    sd_a, sd_b = reference.state_dict(), converted.state_dict()
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert list(to_hf_state_dict(CFG, sd_a)) == list(to_hf_state_dict(CFG, sd_b))
    fresh = model()
    convert_to_fp8(fresh, Fp8Config(), "reference")
    fresh.load_state_dict(sd_a)  # a checkpoint of either loads into the other


def test_high_precision_patterns_keep_modules_and_must_match():
    m = model()
    summary = convert_to_fp8(m, Fp8Config(high_precision=["*.wkv_b", "layers.0.ffn", "mtp.*"]), "reference")
    assert type(m.layers["1"].attn.wkv_b) is nn.Linear and type(m.layers["1"].attn.wkv_a) is Fp8Linear
    assert type(m.layers["0"].ffn).__name__ == "FeedForward" and type(m.mtp[0].eh_proj) is nn.Linear
    assert type(m.mtp[0].block.ffn.experts).__name__ == "Experts"
    assert "layers.0.ffn" in summary.kept


def test_converting_twice_is_refused_and_what_validation_guarantees_is_asserted():
    """Patterns that match nothing, unknown roles and implementations are config errors (exit 2,
    tests/fp8/test_config.py); reaching the conversion with one is a bug, caught by an assertion."""
    m = model()
    convert_to_fp8(m, Fp8Config(), "reference")
    with pytest.raises(ValueError, match="already has FP8 modules"):
        convert_to_fp8(m, Fp8Config(), "reference")
    for cfg, impl in [(Fp8Config(high_precision=["layers.9.*"]), "reference"), (Fp8Config(), "torch"),
                      (Fp8Config(pow2_scales=["attn_out", "everything"]), "reference")]:
        with pytest.raises(AssertionError):
            convert_to_fp8(model(), cfg, impl)
