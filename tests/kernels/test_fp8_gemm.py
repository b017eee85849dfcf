"""FP8 grouped GEMMs equal dequantize-then-matmul on the same quantized operands (interpreter).

Both sides multiply the same E4M3 values and scales; E4M3 products are exact in fp32, so they
differ only in where the scales are applied (per 128-K partial sum vs per element) and in summation
order: ~1e-6 relative in fp32 outputs -> 1e-5. bf16 outputs add one rounding step (<= 2^-7) -> 1e-2.
"""
import pytest
import torch
from kernel_cases import COUNTS, D, I, N, assert_close, offsets_of, randn

from dsv3.kernels import reference
from dsv3.kernels import triton as tk
from dsv3.kernels.fp8_format import Fp8Tensor

REL_FP32, REL_BF16 = 1e-5, 1e-2


def _q(t: torch.Tensor, tiling: str) -> Fp8Tensor:
    return reference.quantize(t, tiling)


def _inputs(case: str):
    counts = COUNTS[case]
    E, M = len(counts), sum(counts)
    return dict(offsets=offsets_of(counts), M=M,
                x=_q(randn(M, D, seed=1), "1x128"), dy=_q(randn(M, N, seed=2), "1x128"),
                w=_q(randn(E, N, D, scale=D ** -0.5, seed=3), "128x128"),
                w13=_q(randn(E, 2 * I, D, scale=D ** -0.5, seed=4), "128x128"),
                w2=_q(randn(E, N, I, scale=I ** -0.5, seed=5), "128x128"),
                gate_up=randn(M, 2 * I, scale=2.0, seed=6))


@pytest.mark.parametrize("case,out_dtype,rel", [("mixed", torch.float32, REL_FP32), ("mixed", torch.bfloat16, REL_BF16),
                                                ("one_expert", torch.float32, REL_FP32)])
def test_fp8_forward_equals_dequantized_matmul(case, out_dtype, rel):
    t = _inputs(case)
    y = tk.grouped_linear(t["x"], t["w"], t["offsets"], out_dtype)
    assert_close(y, reference.grouped_linear(t["x"], t["w"], t["offsets"], out_dtype), rel, "y")


def test_fp8_dgrad_equals_dequantized_matmul():
    t = _inputs("mixed")
    dx = tk.grouped_linear_dgrad(t["dy"], t["w"], t["offsets"], torch.float32)
    assert_close(dx, reference.grouped_linear_dgrad(t["dy"], t["w"], t["offsets"], torch.float32), REL_FP32, "dx")


@pytest.mark.parametrize("layout", ["row-major (reference.quantize)", "column-major (triton quantize)"])
def test_fp8_wgrad_over_128_row_tiles_straddling_experts(layout):
    t = _inputs("mixed")
    dy, x = randn(t["M"], N, seed=7), randn(t["M"], D, seed=8)
    quantize = reference.quantize if layout.startswith("row") else tk.quantize
    dyq, xq = quantize(dy, "128x1"), quantize(x, "128x1")
    dw = tk.grouped_linear_wgrad(dyq, xq, t["offsets"], torch.float32)
    assert_close(dw, reference.grouped_linear_wgrad(dyq, xq, t["offsets"], torch.float32), REL_FP32, "dw")
    assert torch.equal(dw[0], torch.zeros_like(dw[0])) and torch.equal(dw[3], torch.zeros_like(dw[3]))


def test_fp8_gate_up_swiglu_with_gate_and_up_in_shared_weight_blocks():
    # I = 80: the up rows of w13 start inside the first 128-row weight block, so gate and up
    # columns of one output tile read different block scales.
    t = _inputs("mixed")
    h, gate_up = tk.gate_up_swiglu(t["x"], t["w13"], t["offsets"], torch.float32)
    h_ref, gate_up_ref = reference.gate_up_swiglu(t["x"], t["w13"], t["offsets"], torch.float32)
    assert_close(h, h_ref, REL_FP32, "h")
    assert_close(gate_up, gate_up_ref, REL_FP32, "gate_up")


def test_fp8_swiglu_dgrad_equals_reference():
    t = _inputs("mixed")
    d_gate_up, h = tk.swiglu_dgrad(t["dy"], t["w2"], t["gate_up"], t["offsets"], torch.float32)
    d_gate_up_ref, h_ref = reference.swiglu_dgrad(t["dy"], t["w2"], t["gate_up"], t["offsets"], torch.float32)
    assert_close(d_gate_up, d_gate_up_ref, REL_FP32, "d_gate_up")
    assert_close(h, h_ref, REL_FP32, "h")


def test_fp8_operands_must_come_in_pairs_with_matching_scales():
    t = _inputs("one_expert")
    w_bf16 = randn(4, N, D, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="one dtype"):
        tk.grouped_linear(t["x"], w_bf16, t["offsets"])
    bad = Fp8Tensor(t["x"].data, t["x"].scale[:, :1])
    with pytest.raises(ValueError, match=r"needs scales of shape \(200, 2\)"):
        tk.grouped_linear(bad, t["w"], t["offsets"])
