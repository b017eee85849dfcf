"""Ahead-of-time compilation of the shipped kernels for sm_80 / sm_89 / sm_90 without a GPU.

Every kernel is planned exactly as a real launch would be (same `plan_*` code, same config row),
on meta tensors at DeepSeek-V3 expert shapes, then compiled with `triton.compile` for the target
architecture. Its cubin is inspected with the `cuobjdump` that ships in Triton's wheel: which
tensor-core instruction family the SASS uses, registers, shared memory and local-memory spills.
Used by `tests/kernels/test_aot_compile.py` and `benchmarks/kernels/aot_report.py`.
"""
import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv3.kernels.fp8_format import FP8_DTYPE, Fp8Tensor, scale_shape
from dsv3.kernels.triton import grouped_gemm, quant
from dsv3.kernels.triton.configs import ARCHS, FP8_ARCHS
from dsv3.kernels.triton.runtime import Launch

CAPABILITY = {"sm80": 80, "sm89": 89, "sm90": 90}
# Largest dynamic shared memory per block; the sm80 row also serves sm_86/87 (99 KB).
SMEM_LIMIT = {"sm80": 99 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024}
# The tensor-core SASS a GEMM must contain: mma.sync (HMMA; QMMA for FP8 on Ada) or wgmma (HGMMA/QGMMA).
EXPECTED_MMA = {("16bit", "sm80"): "HMMA", ("16bit", "sm89"): "HMMA", ("16bit", "sm90"): "HGMMA",
                ("fp8", "sm89"): "QMMA", ("fp8", "sm90"): "QGMMA"}

# DeepSeek-V3 routed expert: hidden 7168, expert inter 2048; 8 local experts, 8192 routed rows.
M, D, I, E = 8192, 7168, 2048, 8
_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", FP8_DTYPE: "fp8e4nv",
             torch.int32: "i32", torch.int64: "i64"}


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _fp8(*shape, tiling):
    data = _t(*shape, dtype=FP8_DTYPE)
    if tiling == "128x1":  # as quant.quantize returns it: column-major
        data = _t(*shape[:-2], shape[-1], shape[-2], dtype=FP8_DTYPE).transpose(-1, -2)
    return Fp8Tensor(data, _t(*scale_shape(shape, tiling), dtype=torch.float32))


def _gemm_plans(arch: str, fp8: bool) -> dict[str, Launch]:
    offs = _t(E, dtype=torch.int32)
    if fp8:
        x, h, dy = _fp8(M, D, tiling="1x128"), _fp8(M, I, tiling="1x128"), _fp8(M, D, tiling="1x128")
        w13, w2 = _fp8(E, 2 * I, D, tiling="128x128"), _fp8(E, D, I, tiling="128x128")
        dy_cols, h_cols = _fp8(M, D, tiling="128x1"), _fp8(M, I, tiling="128x1")
    else:
        x, h, dy, w13, w2 = _t(M, D), _t(M, I), _t(M, D), _t(E, 2 * I, D), _t(E, D, I)
        dy_cols, h_cols = dy, h
    g = grouped_gemm
    return {
        "gemm_fwd": g.plan_m_grouped(h, w2, offs, transpose_w=True, arch=arch),
        "gemm_dgrad": g.plan_m_grouped(dy, w2, offs, transpose_w=False, arch=arch),
        "gemm_swiglu": g.plan_m_grouped(x, w13, offs, transpose_w=True, epilogue=g.SWIGLU, arch=arch),
        "gemm_dswiglu": g.plan_m_grouped(dy, w2, offs, transpose_w=False, epilogue=g.SWIGLU_BACKWARD,
                                            aux=_t(M, 2 * I), arch=arch),
        "wgrad": g.plan_k_grouped(dy_cols, h_cols, offs, out_dtype=torch.float32, arch=arch),
    }


def _quant_plans(arch: str) -> dict[str, Launch]:
    return {
        "quantize_1x128": quant.plan_quantize(_t(M, D), "1x128", arch=arch),
        "quantize_128x1": quant.plan_quantize(_t(M, D), "128x1", arch=arch),
        "quantize_128x128": quant.plan_quantize(_t(E, 2 * I, D), "128x128", arch=arch),
        "requantize_1x128_to_128x1": quant.plan_quantize(_fp8(M, D, tiling="1x128"), "128x1", src_tiling="1x128",
                                                         arch=arch),
        "dequantize_1x128": quant.plan_dequantize(_fp8(M, D, tiling="1x128"), "1x128", torch.bfloat16, arch=arch),
        "dequantize_128x128": quant.plan_dequantize(_fp8(E, 2 * I, D, tiling="128x128"), "128x128", arch=arch),
    }


def shipped_kernels() -> list[tuple[str, str, str]]:
    """(name, arch, kind) of every kernel at every architecture it ships for; kind: 16bit, fp8, quant."""
    out = []
    for arch in ARCHS:
        out += [(n, arch, "16bit") for n in _gemm_plans(arch, fp8=False)]
        if arch in FP8_ARCHS:
            out += [("fp8_" + n, arch, "fp8") for n in _gemm_plans(arch, fp8=True)]
            out += [(n, arch, "quant") for n in _quant_plans(arch)]
    return out


def plan(name: str, arch: str) -> Launch:
    if name in ("quantize_1x128", "quantize_128x1", "quantize_128x128", "requantize_1x128_to_128x1",
                "dequantize_1x128", "dequantize_128x128"):
        return _quant_plans(arch)[name]
    fp8 = name.startswith("fp8_")
    return _gemm_plans(arch, fp8)[name.removeprefix("fp8_")]


def _signature(launch: Launch):
    """Triton signature, constexprs and divisibility attrs as the JIT would specialize this launch:
    ints equal to 1 become constants, ints and pointers divisible by 16 get `tt.divisibility`."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = launch.args[p.name]
        if p.is_constexpr or v is None or isinstance(v, (bool, str)) or (isinstance(v, int) and v == 1):
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TL_NAMES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 256-byte aligned
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return signature, constexprs, attrs


@dataclass(frozen=True)
class Report:
    name: str
    arch: str
    kind: str
    config: str
    mma: tuple[str, ...]      # tensor-core SASS instruction families found
    registers: int
    shared_bytes: int         # dynamic shared memory the launch needs
    stack_bytes: int
    local_bytes: int
    spill_stores: int         # STL instructions in the SASS


def _cuobjdump(*args: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout


@functools.cache
def compile_report(name: str, arch: str, kind: str) -> Report:
    launch = plan(name, arch)
    signature, constexprs, attrs = _signature(launch)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", CAPABILITY[arch], 32),
                              options=launch.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = _cuobjdump("--dump-sass", f.name)
        usage = _cuobjdump("--dump-resource-usage", f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cannot parse cuobjdump --dump-resource-usage output for {name}/{arch}:\n{usage}")
    regs, stack, _static_shared, local = map(int, found.groups())
    a = launch.args
    blocks = "x".join(str(a[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C") if k in a)
    config = f"{blocks} w{launch.num_warps} s{launch.num_stages}"
    return Report(name, arch, kind, config, tuple(sorted(set(re.findall(r"\b([A-Z]*MMA)\.", sass)))), regs,
                  compiled.metadata.shared, stack, local, len(re.findall(r"\bSTL\b", sass)))


def markdown_table(reports: list[Report]) -> str:
    rows = ["| kernel | arch | config (blocks, warps, stages) | tensor-core SASS | registers | shared mem | "
            "stack | local | spill stores |", "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        rows.append(f"| {r.name} | {r.arch} | {r.config} | {', '.join(r.mma) or '-'} | {r.registers} | "
                    f"{r.shared_bytes // 1024} KB | {r.stack_bytes} | {r.local_bytes} | {r.spill_stores} |")
    return "\n".join(rows)
