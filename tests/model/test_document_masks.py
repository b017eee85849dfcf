"""Document-boundary attention masks: checked on the attention probabilities the kernel computes."""
import pytest
import torch
import torch.nn.functional as F

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights

# moe_tiny's shape: every feature on (q compression, MoE with groups, a dense layer, MTP)
CFG = ModelConfig(vocab_size=64, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                  n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
                  n_limited_groups=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, max_seq_len=64, mtp_depth=1)


def make_model():
    torch.manual_seed(0)
    model = Transformer(CFG)
    init_weights(model, seed=0, std=0.1)  # larger than usual so that attention is far from uniform
    return model.eval()


def documents_of(lengths_per_row, S):
    rows = []
    for lengths in lengths_per_row:
        assert sum(lengths) == S
        rows.append(torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]))
    return torch.stack(rows)


@pytest.fixture
def recorded(monkeypatch):
    """Every attention call's probabilities, as the real kernel computes them: attention applied to an
    identity matrix of values returns the probability matrix itself."""
    real, probs = F.scaled_dot_product_attention, []

    def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
        eye = torch.eye(k.shape[-2], dtype=q.dtype).expand(*k.shape[:-1], k.shape[-2])
        probs.append(real(q, k, eye, attn_mask=attn_mask, is_causal=is_causal, scale=scale).detach())
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return probs


S = 40
LENGTHS = [[10, 15, 15], [1, 38, 1]]  # boundaries in the middle, and one-token documents at both ends


def test_no_token_attends_across_a_document_boundary(recorded):
    model, tokens = make_model(), torch.randint(0, CFG.vocab_size, (2, S))
    docs = documents_of(LENGTHS, S)
    with torch.no_grad():
        model.losses(tokens, torch.randint(0, CFG.vocab_size, (2, S)), docs)
    assert len(recorded) == CFG.n_layers + CFG.mtp_depth
    for probs in recorded:  # [B, H, L, L]; the MTP block sees the first S - 1 positions
        L = probs.shape[-1]
        d = docs[:, :L]
        allowed = (d[:, None, :, None] == d[:, None, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
        allowed = allowed.expand_as(probs)
        assert (probs[~allowed] == 0).all()
        assert (probs[allowed] > 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), rtol=0, atol=1e-5)


def test_without_masks_attention_crosses_documents(recorded):
    """The default (V3 report): causal over the packed sequence, so the first test is not vacuous."""
    model, tokens = make_model(), torch.randint(0, CFG.vocab_size, (2, S))
    with torch.no_grad():
        model.hidden(tokens)
    docs = documents_of(LENGTHS, S)
    for probs in recorded:
        other_doc = (docs[:, None, :, None] != docs[:, None, None, :]).expand_as(probs)
        causal = torch.ones(S, S, dtype=torch.bool).tril().expand_as(probs)
        assert (probs[other_doc & causal] > 0).all() and (probs[~causal] == 0).all()


def test_a_masked_document_is_computed_as_if_it_were_alone():
    """RoPE scores depend on relative positions only, so a document's hidden states do not depend on
    where it lies in the pack, nor on its neighbours."""
    model, tokens = make_model(), torch.randint(0, CFG.vocab_size, (2, S))
    docs = documents_of(LENGTHS, S)
    with torch.no_grad():
        packed = model.hidden(tokens, docs)
        for row, lengths in enumerate(LENGTHS):
            start = 0
            for n in lengths:
                alone = model.hidden(tokens[row:row + 1, start:start + n])
                torch.testing.assert_close(packed[row, start:start + n], alone[0], rtol=1e-4, atol=1e-5)
                start += n


def test_one_document_per_sequence_is_plain_causal_attention():
    model, tokens = make_model(), torch.randint(0, CFG.vocab_size, (2, S + 1))
    with torch.no_grad():
        default = model.losses(tokens[:, :-1], tokens[:, 1:])
        masked = model.losses(tokens[:, :-1], tokens[:, 1:], torch.zeros(2, S, dtype=torch.long))
    torch.testing.assert_close(masked.main, default.main, rtol=1e-6, atol=0)
    torch.testing.assert_close(masked.mtp[0], default.mtp[0], rtol=1e-6, atol=0)
