"""FP8 (E4M3) quantization kernels for the 1x128 / 128x1 / 128x128 tilings of `fp8_format`.

One kernel serves every tiling: a program loads a [BLOCK_R, BLOCK_C] block holding whole tiles,
views it as [tiles_r, GR, tiles_c, GC] and reduces the tile axes. The same kernel re-tiles FP8 data
(dequantize with the source tiling in registers, quantize with the destination tiling), which is how
activations cached in 1x128 FP8 become the 128x1 operands of the wgrad GEMM without a bf16 copy.
Same names and signatures as the twins in `dsv3.kernels.reference`.
"""
import torch
import triton
import triton.language as tl

from dsv3.kernels.fp8_format import (DEFAULT_AMAX_FLOOR, FP8_DTYPE, Fp8Tensor, cdiv, check_amax_floor, check_fp8,
                                     tile_groups)
from dsv3.kernels.triton.configs import QUANT_CONFIGS
from dsv3.kernels.triton.runtime import Launch, arch_for


@triton.jit
def _per_tile(x, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr):
    """[BLOCK_R, BLOCK_C] -> [BLOCK_R // GR, GR, BLOCK_C // GC, GC]."""
    return tl.reshape(x, (BLOCK_R // GR, GR, BLOCK_C // GC, GC))


@triton.jit
def _broadcast(s, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr):
    """One value per tile [BLOCK_R // GR, BLOCK_C // GC] -> every element [BLOCK_R, BLOCK_C]."""
    s = tl.reshape(s, (BLOCK_R // GR, 1, BLOCK_C // GC, 1))
    return tl.reshape(tl.broadcast_to(s, (BLOCK_R // GR, GR, BLOCK_C // GC, GC)), (BLOCK_R, BLOCK_C))


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 (|y| <= 448) to the nearest E4M3 value, ties to even, in exact fp32 arithmetic.

    The cast that follows is then exact. On a GPU the cast alone rounds the same way; Triton's CPU
    interpreter does not (its fp32->fp8 cast drops the carry into the exponent, e.g. 127.2 -> 64),
    and this keeps one code path that is right on both.
    """
    bits = y.to(tl.int32, bitcast=True)
    # Normal range (|y| >= 2^-6): keep 3 of 23 mantissa bits, round half to even via the dropped bits.
    keep_lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + keep_lsb) & -1048576).to(tl.float32, bitcast=True)  # -1048576 = ~0xFFFFF
    # Subnormal range: E4M3 spacing is 2^-9; adding 1.5 * 2^14 (whose fp32 ulp is 2^-9) rounds to it.
    subnormal = (y + 24576.0) - 24576.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def quantize_kernel(
        x_ptr, x_scale_ptr, q_ptr, s_ptr,
        R, C, amax_floor,
        stride_xb, stride_xr, stride_xc, stride_xsb, stride_xsr, stride_xsc,
        stride_qb, stride_qr, stride_qc, stride_sb, stride_sr, stride_sc,
        IN_GR: tl.constexpr, IN_GC: tl.constexpr,  # tiling of x_scale when x is FP8 (re-tiling)
        GR: tl.constexpr, GC: tl.constexpr, POW2: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rr < R)[:, None] & (rc < C)[None, :]
    b64 = b.to(tl.int64)
    rr64 = rr.to(tl.int64)
    rc64 = rc.to(tl.int64)  # column-major (128x1) storage: c * R can pass 2^31
    x = tl.load(x_ptr + b64 * stride_xb + rr64[:, None] * stride_xr + rc64[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)
    if x_scale_ptr is not None:
        ir = pid_r * (BLOCK_R // IN_GR) + tl.arange(0, BLOCK_R // IN_GR)
        ic = pid_c * (BLOCK_C // IN_GC) + tl.arange(0, BLOCK_C // IN_GC)
        in_mask = (ir < tl.cdiv(R, IN_GR))[:, None] & (ic < tl.cdiv(C, IN_GC))[None, :]
        xs = tl.load(x_scale_ptr + b64 * stride_xsb + ir[:, None] * stride_xsr + ic[None, :] * stride_xsc,
                     mask=in_mask, other=0.0)
        x = x * _broadcast(xs, BLOCK_R, BLOCK_C, IN_GR, IN_GC)
    amax = tl.max(tl.max(_per_tile(tl.abs(x), BLOCK_R, BLOCK_C, GR, GC), axis=3), axis=1)
    # IEEE-rounded divisions (div_rn): Triton's `/` on fp32 compiles to an approximate division on
    # CUDA (within 2 ulp), which made GPU scales and codes differ from the twin's in the last bit.
    scale = tl.math.div_rn(tl.maximum(amax, amax_floor), tl.full(amax.shape, 448.0, tl.float32))
    if POW2:
        # Round up to a power of two exactly: a non-zero mantissa bumps the exponent.
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    y = tl.clamp(tl.math.div_rn(x, _broadcast(scale, BLOCK_R, BLOCK_C, GR, GC)), -448.0, 448.0)
    tl.store(q_ptr + b64 * stride_qb + rr64[:, None] * stride_qr + rc64[None, :] * stride_qc,
             _round_to_e4m3(y).to(q_ptr.dtype.element_ty), mask=mask)
    sr = pid_r * (BLOCK_R // GR) + tl.arange(0, BLOCK_R // GR)
    sc = pid_c * (BLOCK_C // GC) + tl.arange(0, BLOCK_C // GC)
    s_mask = (sr < tl.cdiv(R, GR))[:, None] & (sc < tl.cdiv(C, GC))[None, :]
    tl.store(s_ptr + b64 * stride_sb + sr[:, None] * stride_sr + sc[None, :] * stride_sc, scale, mask=s_mask)


@triton.jit
def dequantize_kernel(q_ptr, s_ptr, x_ptr, R, C,
                      stride_qb, stride_qr, stride_qc, stride_sb, stride_sr, stride_sc,
                      stride_xb, stride_xr, stride_xc,
                      GR: tl.constexpr, GC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rr < R)[:, None] & (rc < C)[None, :]
    b64 = b.to(tl.int64)
    rr64 = rr.to(tl.int64)
    rc64 = rc.to(tl.int64)  # column-major (128x1) storage: c * R can pass 2^31
    q = tl.load(q_ptr + b64 * stride_qb + rr64[:, None] * stride_qr + rc64[None, :] * stride_qc, mask=mask, other=0.0)
    sr = pid_r * (BLOCK_R // GR) + tl.arange(0, BLOCK_R // GR)
    sc = pid_c * (BLOCK_C // GC) + tl.arange(0, BLOCK_C // GC)
    s_mask = (sr < tl.cdiv(R, GR))[:, None] & (sc < tl.cdiv(C, GC))[None, :]
    s = tl.load(s_ptr + b64 * stride_sb + sr[:, None] * stride_sr + sc[None, :] * stride_sc, mask=s_mask, other=0.0)
    x = q.to(tl.float32) * _broadcast(s, BLOCK_R, BLOCK_C, GR, GC)
    tl.store(x_ptr + b64 * stride_xb + rr64[:, None] * stride_xr + rc64[None, :] * stride_xc,
             x.to(x_ptr.dtype.element_ty), mask=mask)


def _as3d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() not in (2, 3):
        raise ValueError(f"FP8 quantization takes a 2-D [R, C] or 3-D [B, R, C] tensor, got shape {tuple(t.shape)}")
    return t if t.dim() == 3 else t.unsqueeze(0)


def _blocks(tilings: tuple[str, ...], arch: str) -> tuple[int, int, int]:
    """Block rows/cols holding whole tiles of every tiling involved, and num_warps."""
    cfg = QUANT_CONFIGS[arch]
    rows = max([cfg.block] + [tile_groups(t)[0] for t in tilings])
    cols = max([cfg.block] + [tile_groups(t)[1] for t in tilings])
    # At most ~64 fp32 values per thread: 128x128 blocks (weights, re-tiling) get 8 warps, not spills.
    return rows, cols, max(cfg.num_warps, rows * cols // (32 * 64))


def _new_data(shape: tuple[int, ...], tiling: str, device) -> torch.Tensor:
    """FP8 storage; 128x1 data is stored column-major ([C, R] contiguous, viewed as [R, C]) so that
    the wgrad GEMM, whose reduction runs along R, reads it K-contiguous (needed by FP8 wgmma)."""
    if tiling == "128x1":
        return torch.empty(*shape[:-2], shape[-1], shape[-2], dtype=FP8_DTYPE, device=device).transpose(-1, -2)
    return torch.empty(shape, dtype=FP8_DTYPE, device=device)


def plan_quantize(x: torch.Tensor | Fp8Tensor, tiling: str, *, src_tiling: str | None = None, pow2_scales: bool = False,
                  amax_floor: float = DEFAULT_AMAX_FLOOR, arch: str | None = None) -> Launch:
    gr, gc = tile_groups(tiling)
    if isinstance(x, Fp8Tensor):
        check_fp8(x, src_tiling, "requantize input")
        data, in_scale, (igr, igc) = x.data, x.scale, tile_groups(src_tiling)
    else:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"quantize takes float32, float16 or bfloat16, got {x.dtype}")
        data, in_scale, (igr, igc) = x, None, (1, 1)
    check_amax_floor(amax_floor)
    arch = arch or arch_for(data)
    block_r, block_c, num_warps = _blocks((tiling,) + ((src_tiling,) if in_scale is not None else ()), arch)
    q = _new_data(tuple(data.shape), tiling, data.device)
    s = torch.empty(*data.shape[:-2], cdiv(data.shape[-2], gr), cdiv(data.shape[-1], gc), dtype=torch.float32,
                    device=data.device)
    x3, q3, s3 = _as3d(data), _as3d(q), _as3d(s)
    xs3 = _as3d(in_scale) if in_scale is not None else None
    B, R, C = x3.shape
    args = dict(x_ptr=x3, x_scale_ptr=xs3, q_ptr=q3, s_ptr=s3, R=R, C=C, amax_floor=float(amax_floor),
                stride_xb=x3.stride(0), stride_xr=x3.stride(1), stride_xc=x3.stride(2),
                stride_xsb=xs3.stride(0) if xs3 is not None else 0, stride_xsr=xs3.stride(1) if xs3 is not None else 0,
                stride_xsc=xs3.stride(2) if xs3 is not None else 0,
                stride_qb=q3.stride(0), stride_qr=q3.stride(1), stride_qc=q3.stride(2),
                stride_sb=s3.stride(0), stride_sr=s3.stride(1), stride_sc=s3.stride(2),
                IN_GR=igr, IN_GC=igc, GR=gr, GC=gc, POW2=bool(pow2_scales), BLOCK_R=block_r, BLOCK_C=block_c)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c), B)
    return Launch(quantize_kernel, grid, args, num_warps, 1, (Fp8Tensor(q, s),))


def plan_dequantize(t: Fp8Tensor, tiling: str, dtype: torch.dtype = torch.float32, arch: str | None = None) -> Launch:
    check_fp8(t, tiling, "dequantize input")
    gr, gc = tile_groups(tiling)
    arch = arch or arch_for(t.data)
    block_r, block_c, num_warps = _blocks((tiling,), arch)
    x = torch.empty(t.data.shape, dtype=dtype, device=t.data.device)
    q3, s3, x3 = _as3d(t.data), _as3d(t.scale), _as3d(x)
    B, R, C = q3.shape
    args = dict(q_ptr=q3, s_ptr=s3, x_ptr=x3, R=R, C=C,
                stride_qb=q3.stride(0), stride_qr=q3.stride(1), stride_qc=q3.stride(2),
                stride_sb=s3.stride(0), stride_sr=s3.stride(1), stride_sc=s3.stride(2),
                stride_xb=x3.stride(0), stride_xr=x3.stride(1), stride_xc=x3.stride(2),
                GR=gr, GC=gc, BLOCK_R=block_r, BLOCK_C=block_c)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c), B)
    return Launch(dequantize_kernel, grid, args, num_warps, 1, (x,))


def quantize(x: torch.Tensor, tiling: str = "1x128", *, pow2_scales: bool = False,
             amax_floor: float = DEFAULT_AMAX_FLOOR) -> Fp8Tensor:
    """E4M3 data and fp32 scales, one per tile: scale = max(amax, amax_floor) / 448 (optionally
    rounded up to a power of two). Shapes: see `fp8_format`; 128x1 data comes back column-major."""
    return plan_quantize(x, tiling, pow2_scales=pow2_scales, amax_floor=amax_floor).run()


def dequantize(t: Fp8Tensor, tiling: str = "1x128", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data * scale, broadcast over each tile."""
    return plan_dequantize(t, tiling, dtype).run()


def requantize(t: Fp8Tensor, src_tiling: str = "1x128", dst_tiling: str = "128x1", *,
               pow2_scales: bool = False, amax_floor: float = DEFAULT_AMAX_FLOOR) -> Fp8Tensor:
    """Re-tile FP8 data (dequantize in registers, quantize again), e.g. cached 1x128 activations into
    the 128x1 operand of the wgrad GEMM."""
    return plan_quantize(t, dst_tiling, src_tiling=src_tiling, pow2_scales=pow2_scales, amax_floor=amax_floor).run()
