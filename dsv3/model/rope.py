"""Decoupled rotary embedding with YaRN scaling, as DeepSeek-V3's inference code defines it.

RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... of the `qk_rope_head_dim` channels. When
`max_seq_len > original_seq_len`, YaRN interpolates the low frequencies by `rope_factor`, leaves the
high ones alone and ramps linearly in between (YaRN paper, eq. 17-20), and the attention softmax
scale is multiplied by mscale^2 with mscale = 0.1 * mscale_coeff * ln(factor) + 1.
"""
import math

import torch
from torch import nn

from dsv3.config.schema import ModelConfig


def yarn_enabled(cfg: ModelConfig) -> bool:
    return cfg.max_seq_len > cfg.original_seq_len


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [qk_rope_head_dim / 2], YaRN-corrected when enabled."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not yarn_enabled(cfg):
        return freqs

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    width = (high - low) or 1e-3  # a zero-width ramp degenerates to a step
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / width, 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate by the factor
    return freqs / cfg.rope_factor * (1 - keep) + freqs * keep


def softmax_scale(cfg: ModelConfig) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if yarn_enabled(cfg):
        mscale = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
        scale *= mscale * mscale
    return scale


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables [max_seq_len, qk_rope_head_dim / 2] (recomputed, never checkpointed)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), rope_frequencies(cfg))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x [B, S, H, R] by position; computed in fp32.

    cos, sin: [S, R/2] (every sequence at positions 0..S-1) or [B, S, R/2] (a position per token, as
    decoding with a cache needs)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
