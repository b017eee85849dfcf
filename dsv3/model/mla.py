"""Multi-head Latent Attention (DeepSeek-V2/V3): low-rank joint KV compression, optional low-rank query
compression, and a decoupled RoPE key shared by all heads."""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config.schema import ModelConfig
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_head_dim, bias=False)
        # The compressed latent c_KV and the shared RoPE key come out of one projection.
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)
        # (k, v) -> (k, v) with the keys/values of earlier positions of the same sequences put first, for a
        # caller that runs a sequence in segments (Seq1F1B); None: the input is the whole sequence.
        self.kv_prefix = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: None for causal attention over the whole sequence, or a [B, 1, S, S] boolean mask
        (True = may attend), e.g. `document_mask`."""
        B, S, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, self.n_heads, -1)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)

        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)
        kv = self.wkv_b(self.kv_norm(kv)).view(B, S, self.n_heads, -1)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        # Flash-attention kernels (CPU and GPU) need one head dim for q, k and v; MLA's v is narrower
        # (V3: 128 vs 192), so v is zero-padded and the padding cut from the output. The alternative,
        # the "math" path, materializes the [S, S] scores and does not skip the masked half.
        pad = q.shape[-1] - self.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        if self.kv_prefix is not None:
            k, v = self.kv_prefix(k, v)
            if mask is None and k.shape[1] > S:   # causal, the queries being the last S of the positions
                mask = prefix_causal_mask(S, k.shape[1], x.device)
        # By default packed documents attend causally across document boundaries, as in the V3 report.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=mask is None, scale=self.softmax_scale)
        return self.wo(o[..., :self.v_head_dim].transpose(1, 2).reshape(B, S, -1))


def prefix_causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """[S, T] boolean: query s (at position T-S+s) may attend to keys 0..T-S+s."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """[B, S] document numbers -> [B, 1, S, S] boolean mask: causal, and only within a token's own document.
    (No position reset is needed: RoPE scores depend on relative positions only.)"""
    S = documents.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=documents.device).tril()
    return (documents[:, None, :, None] == documents[:, None, None, :]) & causal
