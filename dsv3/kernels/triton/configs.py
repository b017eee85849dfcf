"""Launch configurations of the Triton kernels, one per (kernel family, architecture).

One fixed config per arch rather than `@triton.autotune`: the interpreter rejects multi-config
autotuning, the grouped GEMMs' row counts change every step (autotune keys would re-tune
constantly), and a fixed table is what the AOT check (`tests/kernels/test_aot_compile.py`)
verifies: it compiles, uses the tensor cores and does not spill, per arch.

Architectures:
- "sm80": A100 and the sm_86/87 cards. Shared memory is kept <= 99 KB per block, the sm_86/89 limit,
  so one row serves them all (A100 could take more stages; it is rarely the bottleneck there).
- "sm89": Ada (L40, RTX 4090): mma.sync incl. FP8 (QMMA), 99 KB shared memory.
- "sm90": Hopper: wgmma (needs num_warps a multiple of 4 and block M >= 64), 227 KB shared memory.
- "interpreter": CPU tests under TRITON_INTERPRET=1: large blocks (the interpreter's time grows
  with the number of programs), one stage.

FP8 GEMMs use block K = 128: one K step is exactly one scale tile, so the partial product is
promoted into the fp32 accumulator with its scales after every 128 of K (report §3.3.2).
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmConfig:
    block_m: int      # rows of the M-grouped tile; for wgrad: block of the N dim of dW
    block_n: int      # columns of the output tile; for wgrad: block of the K dim of dW
    block_k: int      # reduction step; for wgrad: rows (tokens) per step
    group_m: int      # tiles along M sharing a weight tile in L2 (program swizzle); 1 for wgrad
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class QuantConfig:
    block: int        # rows/cols of a block along a dimension that is not tiled by 128
    num_warps: int


ARCHS = ("sm80", "sm89", "sm90")
INTERPRETER = "interpreter"

# Kernel families:
#   gemm          16-bit M-grouped GEMM (forward, dgrad, dgrad + SwiGLU-backward epilogue)
#   gemm_swiglu   16-bit gate/up GEMM with SwiGLU epilogue (two accumulators: half the block N)
#   gemm_dswiglu  16-bit dgrad of the down projection with SwiGLU-backward epilogue (3 outputs)
#   wgrad         16-bit K-grouped GEMM (dW per expert)
#   fp8_*         the same with E4M3 operands and per-128-K scale promotion
GEMM_CONFIGS: dict[tuple[str, str], GemmConfig] = {
    ("gemm", "sm80"): GemmConfig(128, 128, 32, 8, num_warps=4, num_stages=4),
    ("gemm", "sm89"): GemmConfig(128, 128, 32, 8, num_warps=4, num_stages=4),
    ("gemm", "sm90"): GemmConfig(128, 256, 64, 8, num_warps=8, num_stages=3),
    ("gemm_swiglu", "sm80"): GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=4),
    ("gemm_swiglu", "sm89"): GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=4),
    ("gemm_swiglu", "sm90"): GemmConfig(128, 64, 64, 8, num_warps=8, num_stages=4),
    ("gemm_dswiglu", "sm80"): GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=4),
    ("gemm_dswiglu", "sm89"): GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=4),
    ("gemm_dswiglu", "sm90"): GemmConfig(128, 64, 64, 8, num_warps=8, num_stages=4),
    ("wgrad", "sm80"): GemmConfig(128, 128, 32, 1, num_warps=8, num_stages=4),
    ("wgrad", "sm89"): GemmConfig(128, 128, 32, 1, num_warps=8, num_stages=4),
    ("wgrad", "sm90"): GemmConfig(128, 128, 64, 1, num_warps=8, num_stages=4),
    ("fp8_gemm", "sm89"): GemmConfig(128, 64, 128, 8, num_warps=8, num_stages=3),
    ("fp8_gemm", "sm90"): GemmConfig(128, 128, 128, 8, num_warps=8, num_stages=4),
    ("fp8_gemm_swiglu", "sm89"): GemmConfig(128, 32, 128, 8, num_warps=8, num_stages=3),
    ("fp8_gemm_swiglu", "sm90"): GemmConfig(128, 64, 128, 8, num_warps=8, num_stages=4),
    ("fp8_gemm_dswiglu", "sm89"): GemmConfig(64, 64, 128, 8, num_warps=8, num_stages=3),
    ("fp8_gemm_dswiglu", "sm90"): GemmConfig(128, 64, 128, 8, num_warps=8, num_stages=4),
    ("fp8_wgrad", "sm89"): GemmConfig(64, 128, 128, 1, num_warps=4, num_stages=3),
    ("fp8_wgrad", "sm90"): GemmConfig(128, 128, 128, 1, num_warps=8, num_stages=4),
    # One config for the CPU interpreter; block K 128 for FP8 as everywhere.
    ("gemm", INTERPRETER): GemmConfig(128, 128, 128, 2, num_warps=4, num_stages=1),
    ("gemm_swiglu", INTERPRETER): GemmConfig(128, 64, 128, 2, num_warps=4, num_stages=1),
    ("gemm_dswiglu", INTERPRETER): GemmConfig(128, 128, 128, 2, num_warps=4, num_stages=1),
    ("wgrad", INTERPRETER): GemmConfig(128, 128, 128, 1, num_warps=4, num_stages=1),
    ("fp8_gemm", INTERPRETER): GemmConfig(128, 128, 128, 2, num_warps=4, num_stages=1),
    ("fp8_gemm_swiglu", INTERPRETER): GemmConfig(128, 64, 128, 2, num_warps=4, num_stages=1),
    ("fp8_gemm_dswiglu", INTERPRETER): GemmConfig(128, 128, 128, 2, num_warps=4, num_stages=1),
    ("fp8_wgrad", INTERPRETER): GemmConfig(128, 128, 128, 1, num_warps=4, num_stages=1),
}

QUANT_CONFIGS: dict[str, QuantConfig] = {
    "sm80": QuantConfig(32, num_warps=4),
    "sm89": QuantConfig(32, num_warps=4),
    "sm90": QuantConfig(32, num_warps=4),
    INTERPRETER: QuantConfig(64, num_warps=4),
}

FP8_ARCHS = ("sm89", "sm90")


def arch_of(device: torch.device) -> str:
    """The config row of a CUDA device: sm_80/86/87 -> sm80, sm_89 -> sm89, sm_90 and datacenter
    Blackwell (sm_100/103) -> sm90; consumer Blackwell (sm_120) has Ada's 99 KB of shared memory per
    block -> sm89. Rows for Blackwell are a guess: only sm_80/89/90 are compiled and checked."""
    major, minor = torch.cuda.get_device_capability(device)
    if major in (9, 10):
        return "sm90"
    if (major, minor) == (8, 9) or major >= 11:
        return "sm89"
    if major == 8:
        return "sm80"
    raise RuntimeError(f"the Triton grouped GEMMs need compute capability >= 8.0, device {device} has {major}.{minor}")


def gemm_config(family: str, arch: str) -> GemmConfig:
    if (family, arch) not in GEMM_CONFIGS:
        known = sorted({a for f, a in GEMM_CONFIGS if f == family})
        raise KeyError(f"no launch config for kernel family {family!r} on {arch!r}; it has configs for {known}")
    return GEMM_CONFIGS[(family, arch)]
