"""Our model against Hugging Face's independent DeepseekV3ForCausalLM on converted weights (fp32)."""
import dataclasses

import pytest
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.model.hf_format import from_hf_state_dict, save_hf, to_hf_state_dict

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, dim=48, inter_dim=80, moe_inter_dim=24, n_layers=3, n_heads=4, kv_lora_rank=24,
            qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12, mtp_depth=1, max_seq_len=64)

CASES = {
    "q_compression_groups_yarn": dict(q_lora_rank=20, n_routed_experts=12, n_activated_experts=3, n_expert_groups=4,
                                      n_limited_groups=2, n_dense_layers=1, route_scale=2.5, max_seq_len=256,
                                      original_seq_len=32, rope_factor=8.0, mscale=1.0),
    "no_q_compression_one_group": dict(q_lora_rank=0, n_routed_experts=8, n_activated_experts=2, n_dense_layers=0,
                                       n_shared_experts=2),
    "two_dense_layers_yarn_mscale": dict(q_lora_rank=16, n_routed_experts=16, n_activated_experts=4, n_expert_groups=8,
                                         n_limited_groups=3, n_dense_layers=2, route_scale=1.5, max_seq_len=128,
                                         original_seq_len=16, rope_factor=16.0, mscale=0.707, beta_fast=16),
}


def build_pair(case: dict, seed: int, tmp_path):
    cfg = ModelConfig(**{**BASE, **case})
    ours = Transformer(cfg).eval()
    init_weights(ours, seed=seed, std=0.05)  # larger than 0.006 so routing and attention are far from uniform
    with torch.no_grad():  # non-zero balancing biases so selection (score + b) differs from the weights (s)
        for moe in ours.moe_layers():
            moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    # Through the files a user gets from launch/export_hf.py, loaded the way a user loads them.
    save_hf(str(tmp_path), cfg, ours.state_dict())
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    mtp_prefix = f"model.layers.{cfg.n_layers}."  # MTP weights, which HF's model has no place for
    assert all(k.startswith(mtp_prefix) for k in info["unexpected_keys"]), info["unexpected_keys"]
    return cfg, ours, theirs.eval()


def capture_router_choices(model, gate_type):
    choices = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: choices.append(out))
             for m in model.modules() if isinstance(m, gate_type)]
    return choices, hooks


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_router_choices_match_hf(name, tmp_path):
    from dsv3.model.moe import Gate

    cfg, ours, theirs = build_pair(CASES[name], seed=len(name), tmp_path=tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    ours_choices, h1 = capture_router_choices(ours, Gate)
    theirs_choices, h2 = capture_router_choices(theirs, transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter)
    with torch.no_grad():
        a = ours(tokens)
        b = theirs(tokens).logits
    for h in h1 + h2:
        h.remove()
    # fp32 all the way; the two implementations order a few reductions differently (SDPA vs eager softmax,
    # complex vs real RoPE), which costs a few ulps, far below 1e-5 relative.
    rel = (a - b).norm() / b.norm()
    assert rel < 1e-5, f"relative logit error {rel:.2e}"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert len(ours_choices) == len(theirs_choices) == cfg.n_layers - cfg.n_dense_layers
    for (_, idx, _), (_, _, their_idx) in zip(ours_choices, theirs_choices):
        assert torch.equal(idx.sort(dim=-1).values, their_idx.sort(dim=-1).values)


def test_round_trip_ours_hf_ours_is_exact(tmp_path):
    cfg, ours, _ = build_pair(CASES["q_compression_groups_yarn"], seed=3, tmp_path=tmp_path)
    sd = ours.state_dict()
    back = from_hf_state_dict(cfg, to_hf_state_dict(cfg, sd))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_yarn_is_really_on_in_the_yarn_cases():
    from dsv3.model.rope import rope_frequencies, yarn_enabled

    cfg = ModelConfig(**{**BASE, **CASES["two_dense_layers_yarn_mscale"]})
    assert yarn_enabled(cfg)
    plain = rope_frequencies(dataclasses.replace(cfg, max_seq_len=cfg.original_seq_len))
    assert not torch.allclose(rope_frequencies(cfg), plain)
