"""Training FLOPs per token: the GEMMs of the main model, its attention core (which grows with the
sequence), and the MTP modules; two FLOPs per multiply-add, backward twice the forward.

`model` FLOPs are what the architecture needs: causal attention (a query at position i reads i+1 keys),
values of their own width. That is what MFU divides by. `executed=True` counts what this code
computes instead: every query against every key of the sequence (what a dense-masked attention, and
`torch.utils.flop_counter`, count) with the values zero-padded to the query/key width (MLA's values are
narrower; the flash kernels need one head dim), the reference the tests compare with.
Not counted: norms, activations, softmax, routing, the loss (element-wise work, a fraction of a percent).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.config.schema import ModelConfig


@dataclass(frozen=True)
class Flops:
    """Training FLOPs (forward + backward) per token of the sequence."""

    gemm: float        # main model: projections, FFNs, the routed experts a token uses, router, head
    attention: float   # main model: the attention core (scores and weighted values)
    mtp: float         # the MTP modules, everything included

    @property
    def main(self) -> float:
        return self.gemm + self.attention

    @property
    def total(self) -> float:
        return self.gemm + self.attention + self.mtp


def layer_gemm_flops(c: ModelConfig, moe: bool) -> float:
    """Forward GEMM FLOPs of one layer, per token (attention core excluded)."""
    H, qk = c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    q = c.dim * c.q_lora_rank + c.q_lora_rank * H * qk if c.q_lora_rank > 0 else c.dim * H * qk
    attn = q + c.dim * (c.kv_lora_rank + c.qk_rope_head_dim) \
        + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) \
        + H * c.v_head_dim * c.dim
    if moe:
        ffn = c.dim * c.n_routed_experts + 3 * c.dim * c.moe_inter_dim * (c.n_activated_experts + c.n_shared_experts)
    else:
        ffn = 3 * c.dim * c.inter_dim
    return 2.0 * (attn + ffn)


def attention_flops(c: ModelConfig, seq: int, executed: bool = False) -> float:
    """Forward FLOPs of one layer's attention core, per token, for sequences of `seq` tokens."""
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    v = max(qk, c.v_head_dim) if executed else c.v_head_dim
    keys = seq if executed else (seq + 1) / 2          # mean keys a query reads
    return 2.0 * c.n_heads * (qk + v) * keys


def training_flops(c: ModelConfig, seq: int, executed: bool = False) -> Flops:
    """Per token of a sequence of `seq` tokens; training = 3 x forward (dX and dW GEMMs in backward)."""
    moe = [i >= c.n_dense_layers for i in range(c.n_layers)]
    gemm = sum(layer_gemm_flops(c, m) for m in moe) + 2.0 * c.dim * c.vocab_size
    attention = c.n_layers * attention_flops(c, seq, executed)
    mtp = 0.0
    for k in range(1, c.mtp_depth + 1):
        length = seq - k                 # depth k predicts k+1 ahead: the last k positions have no target
        block_moe = c.n_layers + k - 1 >= c.n_dense_layers
        per_token = 2.0 * 2 * c.dim * c.dim + layer_gemm_flops(c, block_moe) + 2.0 * c.dim * c.vocab_size \
            + attention_flops(c, length, executed)
        mtp += per_token * length / seq
    return Flops(3 * gemm, 3 * attention, 3 * mtp)
