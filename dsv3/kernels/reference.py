"""Plain-PyTorch twins of every kernel. Slow and obvious on purpose: tests compare the fast paths to these.

Layout shared by all grouped ops ("contiguous expert-major"): the rows of every expert live in one
tensor `x [M, K]`, expert e owning rows `offsets[e-1]:offsets[e]` (`offsets [E]` int32, cumulative
ends, `offsets[-1] == M`, empty experts allowed). Expert weights are 3-D in nn.Linear order
`[E, N, K]` (out features, in features).

Every GEMM twin accepts either plain tensors or `Fp8Tensor`s (see `fp8_format`); FP8 operands are
dequantized and multiplied in fp32, which is numerically an FP8 GEMM with fp32 accumulation
(the per-128 promotion of the kernels only changes the summation order). Products are always
accumulated in fp32 and rounded once to the output dtype, as the kernels do.
"""
import torch
import torch.nn.functional as F

from dsv3.kernels.fp8_format import (DEFAULT_AMAX_FLOOR, FP8_DTYPE, FP8_MAX, Fp8Tensor, cdiv, check_amax_floor,
                                     check_fp8, tile_groups)

Operand = torch.Tensor | Fp8Tensor


def expert_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) row range of every expert; a host sync, fine for a reference."""
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


# ----------------------------------------------------------------------------------------------
# FP8 quantization (1x128, 128x1, 128x128 tiles)
# ----------------------------------------------------------------------------------------------

def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (scale > 0)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).int())


def _tiles(x: torch.Tensor, tiling: str) -> torch.Tensor:
    """[.., R, C] -> [.., R/gr, gr, C/gc, gc], zero-padded to whole tiles."""
    gr, gc = tile_groups(tiling)
    *batch, rows, cols = x.shape
    x = F.pad(x, (0, cdiv(cols, gc) * gc - cols, 0, cdiv(rows, gr) * gr - rows))
    return x.reshape(*batch, cdiv(rows, gr), gr, cdiv(cols, gc), gc)


def _untile(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    *batch, tr, gr, tc, gc = tiles.shape
    return tiles.reshape(*batch, tr * gr, tc * gc)[..., :rows, :cols]


def quantize(x: torch.Tensor, tiling: str = "1x128", *, pow2_scales: bool = False,
             amax_floor: float = DEFAULT_AMAX_FLOOR) -> Fp8Tensor:
    """E4M3 data and fp32 scales, one scale per tile: scale = max(amax, amax_floor) / 448."""
    check_amax_floor(amax_floor)
    rows, cols = x.shape[-2:]
    tiles = _tiles(x.float(), tiling)
    scale = tiles.abs().amax(dim=(-3, -1)).clamp_min(amax_floor) / FP8_MAX
    if pow2_scales:
        scale = pow2_ceil(scale)
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return Fp8Tensor(_untile(q, rows, cols).to(FP8_DTYPE), scale)


def dequantize(t: Fp8Tensor, tiling: str = "1x128", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data * scale, broadcast over each tile."""
    check_fp8(t, tiling, "dequantize input")
    rows, cols = t.data.shape[-2:]
    tiles = _tiles(t.data.float(), tiling) * t.scale[..., :, None, :, None]
    return _untile(tiles, rows, cols).to(dtype)


def requantize(t: Fp8Tensor, src_tiling: str = "1x128", dst_tiling: str = "128x1", *,
               pow2_scales: bool = False, amax_floor: float = DEFAULT_AMAX_FLOOR) -> Fp8Tensor:
    """Re-tile cached FP8 data (e.g. 1x128 rows -> 128x1 columns for the wgrad GEMM)."""
    return quantize(dequantize(t, src_tiling), dst_tiling, pow2_scales=pow2_scales, amax_floor=amax_floor)


# ----------------------------------------------------------------------------------------------
# Grouped GEMMs
# ----------------------------------------------------------------------------------------------

def _fp32(t: Operand, tiling: str, name: str) -> torch.Tensor:
    if isinstance(t, Fp8Tensor):
        check_fp8(t, tiling, name)
        return dequantize(t, tiling)
    return t.float()


def _out_dtype(t: Operand, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.bfloat16 if isinstance(t, Fp8Tensor) else t.dtype


def grouped_linear(x: Operand, w: Operand, offsets: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward: y[rows of e] = x[rows of e] @ w[e].T, one expert at a time. FP8: x 1x128, w 128x128."""
    xf, wf = _fp32(x, "1x128", "x"), _fp32(w, "128x128", "w")
    y = xf.new_zeros(xf.shape[0], wf.shape[1])
    for e, (a, b) in enumerate(expert_bounds(offsets)):
        y[a:b] = xf[a:b] @ wf[e].t()
    return y.to(_out_dtype(x, out_dtype))


def grouped_linear_dgrad(dy: Operand, w: Operand, offsets: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Input gradient: dx[rows of e] = dy[rows of e] @ w[e]. FP8: dy 1x128 (along N), w 128x128."""
    dyf, wf = _fp32(dy, "1x128", "dy"), _fp32(w, "128x128", "w")
    dx = dyf.new_zeros(dyf.shape[0], wf.shape[2])
    for e, (a, b) in enumerate(expert_bounds(offsets)):
        dx[a:b] = dyf[a:b] @ wf[e]
    return dx.to(_out_dtype(dy, out_dtype))


def grouped_linear_wgrad(dy: Operand, x: Operand, offsets: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weight gradient: dw[e] = dy[rows of e].T @ x[rows of e] ([E, N, K]; zeros for an empty expert).
    FP8: both 128x1-quantized (the reduction runs over tokens)."""
    dyf, xf = _fp32(dy, "128x1", "dy"), _fp32(x, "128x1", "x")
    bounds = expert_bounds(offsets)
    dw = dyf.new_zeros(len(bounds), dyf.shape[1], xf.shape[1])
    for e, (a, b) in enumerate(bounds):
        dw[e] = dyf[a:b].t() @ xf[a:b]
    return dw.to(_out_dtype(dy, out_dtype))


# ----------------------------------------------------------------------------------------------
# SwiGLU experts
# ----------------------------------------------------------------------------------------------

def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [.., 2I] projection whose first half is the gate and second half the up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(gate_up: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate_up, h) for h = silu(gate) * up, computed in fp32: what the fused dgrad epilogue writes."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    dh = dh.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = dh * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, dh * silu], dim=-1), silu * up


def gate_up_swiglu(x: Operand, w13: Operand, offsets: torch.Tensor, out_dtype: torch.dtype | None = None,
                   save_gate_up: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, gate_up): h = silu(gate) * up from the fp32 projection (rounded once), and the rounded
    projection itself (None unless save_gate_up), which backward keeps to recompute h instead of
    storing it (report §3.3.3)."""
    dtype = _out_dtype(x, out_dtype)
    gate_up = grouped_linear(x, w13, offsets, torch.float32)
    return swiglu(gate_up).to(dtype), gate_up.to(dtype) if save_gate_up else None


def swiglu_dgrad(dy: Operand, w2: Operand, gate_up: torch.Tensor, offsets: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward through down(swiglu(gate_up)): (d_gate_up, h) with dh = dy @ w2[e] and h recomputed."""
    dtype = _out_dtype(dy, out_dtype)
    dh = grouped_linear_dgrad(dy, w2, offsets, torch.float32)
    d_gate_up, h = swiglu_backward(gate_up, dh)
    return d_gate_up.to(dtype), h.to(dtype)


def expert_swiglu_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Routed experts: down(silu(gate(x)) * up(x)); w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]."""
    return grouped_linear(swiglu(grouped_linear(x, w13, offsets)), w2, offsets)
