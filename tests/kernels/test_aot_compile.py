"""Every shipped kernel compiles for its GPU architectures at its shipped config, uses the tensor
cores it should and does not spill: checked on CPU by compiling ahead of time (compiler mode).

Each (kernel, arch) is compiled once per session (`aot.compile_report` is cached); Triton's disk
cache makes reruns fast. `benchmarks/kernels/aot_report.py` prints the same data as the table in
docs/kernels.md.
"""
import pytest

from dsv3.kernels.triton import aot
from dsv3.kernels.triton.configs import gemm_config

KERNELS = aot.shipped_kernels()


@pytest.mark.parametrize("name,arch,kind", KERNELS, ids=[f"{n}-{a}" for n, a, _ in KERNELS])
def test_kernel_compiles_with_tensor_cores_and_without_spills(name, arch, kind):
    r = aot.compile_report(name, arch, kind)
    if kind != "quant":
        expected = aot.EXPECTED_MMA[(kind, arch)]
        assert r.mma == (expected,), f"{name} on {arch} should use {expected} only, its SASS has {r.mma or 'no MMA'}"
    assert r.spill_stores == 0 and r.local_bytes == 0, (
        f"{name} on {arch} ({r.config}) spills: {r.spill_stores} STL, {r.local_bytes} B local, {r.registers} registers")
    assert r.shared_bytes <= aot.SMEM_LIMIT[arch], (
        f"{name} on {arch} ({r.config}) needs {r.shared_bytes} B shared memory, the limit is {aot.SMEM_LIMIT[arch]}")


def test_every_architecture_ships_every_kernel_family():
    names = {(n, a) for n, a, _ in KERNELS}
    for arch in ("sm80", "sm89", "sm90"):
        for n in ("gemm_fwd", "gemm_dgrad", "gemm_swiglu", "gemm_dswiglu", "wgrad"):
            assert (n, arch) in names
    for arch in ("sm89", "sm90"):
        for n in ("fp8_gemm_fwd", "fp8_wgrad", "quantize_1x128", "requantize_1x128_to_128x1"):
            assert (n, arch) in names


def test_no_fp8_config_below_sm89():
    # FP8 tl.dot does not compile for sm_80 (resolution refuses FP8 there: test_resolve.py).
    with pytest.raises(KeyError, match="no launch config for kernel family 'fp8_gemm' on 'sm80'"):
        gemm_config("fp8_gemm", "sm80")
