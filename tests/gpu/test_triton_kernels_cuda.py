"""The Triton kernels compiled for this GPU equal their plain-PyTorch twins run on the CPU on the same
inputs (the awkward shapes of the interpreter tests, plus DeepSeek-V3's expert shape).

Tolerances, relative to max |expected|: both sides multiply exactly and accumulate in fp32; they
differ in summation order and in the final rounding of a 16-bit output (2^-8 for bf16, 2^-11 for
fp16), hence 1e-2 / 2e-3, and 5e-5 for fp32 (IEEE dot products, ~hundreds of terms reordered; a
TF32 product, 2^-11 per operand, would fail it). FP8 quantization is exact arithmetic on both sides:
bit-identical. FP8 GEMMs take the same quantized operands, so only the summation order differs.
"""
import pytest
import torch
from conftest import DEVICE, DRY_RUN, full_size, needs_fp8
from kernel_cases import COUNTS, D, I, N, assert_close, offsets_of, randn

from dsv3.kernels import reference as ref

REL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = {  # name: (rows per expert, model dim, output width, expert inter dim)
    "mixed": (COUNTS["mixed"], D, N, I),
    "one_expert": (COUNTS["one_expert"], D, N, I),
    "v3_expert": ([0, 1, 300, 517, 129, 1024, 64, 255], 7168, 7168, 2048),
}


def _tk():
    from dsv3.kernels import triton as tk
    return tk


def _inputs(shape: str, dtype: torch.dtype) -> dict:
    counts, d, n, i = SHAPES[shape]
    E, M = len(counts), sum(counts)
    return dict(offsets=offsets_of(counts), counts=counts,
                x=randn(M, d, dtype=dtype, seed=1), dy=randn(M, n, dtype=dtype, seed=2),
                w=randn(E, n, d, dtype=dtype, scale=d ** -0.5, seed=3),
                w13=randn(E, 2 * i, d, dtype=dtype, scale=d ** -0.5, seed=4),
                w2=randn(E, n, i, dtype=dtype, scale=i ** -0.5, seed=5),
                gate_up=randn(M, 2 * i, dtype=dtype, scale=2.0, seed=6))


def _dev(t):
    """Onto the device under test; Fp8Tensor (a NamedTuple) stays one."""
    from dsv3.kernels.fp8_format import Fp8Tensor
    if isinstance(t, Fp8Tensor):
        return Fp8Tensor(t.data.to(DEVICE), t.scale.to(DEVICE))
    return t.to(DEVICE)


def _both(fn_name: str, t: dict, *names: str, **kw):
    """(GPU kernel result moved to the CPU, CPU twin result) of one function on the same inputs."""
    args = [t[n] for n in names] + [t["offsets"]]
    got = getattr(_tk(), fn_name)(*map(_dev, args), **kw)
    want = getattr(ref, fn_name)(*args, **kw)
    to_cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else tuple(x.cpu() for x in v)  # noqa: E731
    return to_cpu(got), want


CASES = [("mixed", torch.float32), ("mixed", torch.float16), ("mixed", torch.bfloat16),
         ("one_expert", torch.bfloat16), pytest.param("v3_expert", torch.bfloat16, marks=full_size)]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_grouped_linear_fwd_dgrad_wgrad_equal_twin(shape, dtype):
    t = _inputs(shape, dtype)
    if shape == "v3_expert":  # w [E, 7168, 7168] would be 800 MB per operand: use the expert w2 shape
        t["w"] = t["w2"]
        t["dy"] = randn(t["x"].shape[0], t["w2"].shape[1], dtype=dtype, seed=2)
        t["x"] = randn(t["x"].shape[0], t["w2"].shape[2], dtype=dtype, seed=1)
    got, want = _both("grouped_linear", t, "x", "w")
    assert_close(got, want, REL[dtype], "y")
    got, want = _both("grouped_linear_dgrad", t, "dy", "w")
    assert_close(got, want, REL[dtype], "dx")
    got, want = _both("grouped_linear_wgrad", t, "dy", "x", out_dtype=torch.float32)
    assert_close(got, want, REL[torch.float32] if dtype == torch.float32 else 1e-5, "dw")
    for e, rows in enumerate(t["counts"]):
        if rows == 0:
            assert torch.all(got[e] == 0), f"expert {e} has no rows but a nonzero weight gradient"


@pytest.mark.parametrize("shape,dtype", CASES)
def test_swiglu_epilogues_equal_twin(shape, dtype):
    t = _inputs(shape, dtype)
    (h, gate_up), (h_ref, gate_up_ref) = _both("gate_up_swiglu", t, "x", "w13", save_gate_up=True)
    assert_close(h, h_ref, REL[dtype], "h")
    assert_close(gate_up, gate_up_ref, REL[dtype], "gate_up")
    t["dy"] = randn(h.shape[0], t["w2"].shape[1], dtype=dtype, seed=7)
    (d_gu, h2), (d_gu_ref, h2_ref) = _both("swiglu_dgrad", t, "dy", "w2", "gate_up")
    assert_close(d_gu, d_gu_ref, REL[dtype], "d_gate_up")
    assert_close(h2, h2_ref, REL[dtype], "recomputed h")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expert_mlp_autograd_on_gpu_equals_reference_on_cpu(dtype):
    """The whole routed-expert MLP with its backward (ExpertSwiGLUFunction over the Triton kernels)."""
    from dsv3.kernels import ops
    t = _inputs("mixed", dtype)
    outs = []
    for device, impl in ((DEVICE, "triton"), ("cpu", "reference")):
        x, w13, w2 = (t[n].to(device).float().requires_grad_() for n in ("x", "w13", "w2"))
        y = ops.expert_swiglu_mlp(x.to(dtype), w13.to(dtype), w2.to(dtype), t["offsets"].to(device), impl)
        y.float().backward(randn(*y.shape, seed=9).to(device))
        outs.append([v.detach().cpu() for v in (y.float(), x.grad, w13.grad, w2.grad)])
    for name, got, want in zip(("y", "dx", "dw13", "dw2"), *outs):
        assert_close(got, want, 3 * REL[dtype], name)  # three chained 16-bit roundings in the backward


@pytest.mark.parametrize("tiling", ["1x128", "128x1", "128x128"])
@pytest.mark.parametrize("pow2", [False, True])
@needs_fp8
def test_fp8_quantize_is_bit_identical_to_twin(tiling, pow2):
    shape = (3, 300, 260) if tiling == "128x128" else ((129, 300) if DRY_RUN else (517, 7168 + 72))
    x = randn(*shape, scale=3.0, seed=11).to(torch.bfloat16)
    x.view(-1)[:128] = 0  # an all-zero tile: the amax floor
    got = _tk().quantize(x.to(DEVICE), tiling, pow2_scales=pow2)
    want = ref.quantize(x, tiling, pow2_scales=pow2)
    assert torch.equal(got.scale.cpu(), want.scale), "scales differ"
    # Values, not codes: the kernel flushes tiny negatives to +0 where the twin gives -0 (equal numbers,
    # the same products in every GEMM).
    assert torch.equal(got.data.cpu().float(), want.data.float()), "E4M3 values differ"
    if tiling == "1x128":
        cols, cols_ref = _tk().requantize(got, "1x128", "128x1", pow2_scales=pow2), \
            ref.requantize(want, "1x128", "128x1", pow2_scales=pow2)
        assert torch.equal(cols.scale.cpu(), cols_ref.scale) and torch.equal(
            cols.data.cpu().float(), cols_ref.data.float()), "requantize 1x128 -> 128x1 differs"
        back = _tk().dequantize(got, "1x128", torch.float32).cpu()
        assert torch.equal(back, ref.dequantize(want, "1x128", torch.float32)), "dequantize differs"


# Hopper's FP8 tensor cores accumulate a product sum with only ~14 bits (V3 report §3.3.2); the kernels
# promote to fp32 every 128 of K, as the report does, so inside one 128-long block the sum is kept that
# coarsely. A block is 4 WGMMA instructions (K = 32 each), each adding to the accumulator with a
# truncation of at most 2^-13 of the block's sum of |products|: 2^-11 sum |a_k b_k|, doubled for margin.
# The twin sums exactly in fp32 (the CPU tests pin the data path to 1e-5 there).
FP8_ACC = 2.0 ** -10


def _abs(t):
    """|operand|, quantized operands included (exact: E4M3 is sign-magnitude)."""
    from dsv3.kernels.fp8_format import Fp8Tensor
    if isinstance(t, Fp8Tensor):
        return Fp8Tensor(t.data.float().abs().to(t.data.dtype), t.scale)
    return t.abs()


def assert_within_fp8_accumulation(got, want, abs_products, what: str):
    """|got - want| <= 2^-10 sum|a b| (+ one rounding of a 16-bit output: 2^-7 covers the interpreter's
    truncation, + fp32 reordering), elementwise."""
    rounding = 2.0 ** -7 if want.dtype in (torch.bfloat16, torch.float16) else 0.0
    got, want, abs_products = got.double(), want.double(), abs_products.double()
    bound = FP8_ACC * abs_products + 1e-6 * want.abs().max() + rounding * want.abs()
    worst = ((got - want).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: error exceeds the FP8-accumulation bound by {worst:.3g}x"


@pytest.mark.parametrize("shape", ["mixed", pytest.param("v3_expert", marks=full_size)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@needs_fp8
def test_fp8_grouped_gemms_equal_twin_on_the_same_quantized_operands(shape, out_dtype):
    t = _inputs(shape, torch.bfloat16)
    ops = dict(x=ref.quantize(t["x"], "1x128"),
               h=ref.quantize(t["gate_up"][:, : t["w2"].shape[2]].contiguous(), "1x128"),
               w13=ref.quantize(t["w13"], "128x128"), w2=ref.quantize(t["w2"], "128x128"),
               dy=ref.quantize(randn(t["x"].shape[0], t["w2"].shape[1], seed=8).to(torch.bfloat16), "1x128"),
               dy_cols=ref.quantize(randn(t["x"].shape[0], t["w13"].shape[1], seed=10).to(torch.bfloat16), "128x1"),
               x_cols=ref.quantize(t["x"], "128x1"), off=t["offsets"])
    cases = {  # name: (kernel call on a backend and operands, output dtype)
        "gate_up (fused SwiGLU kernel)": lambda k, o: k.gate_up_swiglu(o["x"], o["w13"], o["off"], out_dtype,
                                                                        save_gate_up=True)[1],
        "down": lambda k, o: k.grouped_linear(o["h"], o["w2"], o["off"], out_dtype),
        "dgrad": lambda k, o: k.grouped_linear_dgrad(o["dy"], o["w2"], o["off"], out_dtype),
        "wgrad": lambda k, o: k.grouped_linear_wgrad(o["dy_cols"], o["x_cols"], o["off"], torch.float32),
    }
    on_device = {n: _dev(v) for n, v in ops.items()}
    absolute = {n: (v if n == "off" else _abs(v)) for n, v in ops.items()}
    for name, run in cases.items():
        got = run(_tk(), on_device).cpu()
        want = run(ref, ops)
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert_within_fp8_accumulation(got, want, run(ref, absolute).float(), name)
    h, _ = _tk().gate_up_swiglu(on_device["x"], on_device["w13"], on_device["off"], out_dtype)
    assert_close(h.cpu(), ref.gate_up_swiglu(ops["x"], ops["w13"], ops["off"], out_dtype)[0], 2e-2, "h = SwiGLU(gate_up)")
