"""The 16-bit/fp32 grouped GEMM kernels equal their plain-PyTorch twins (runs in the interpreter)."""
import pytest
import torch
from kernel_cases import COUNTS, D, I, N, assert_close, offsets_of, randn

from dsv3.kernels import reference
from dsv3.kernels import triton as tk

# Kernel and twin both multiply exactly and accumulate in fp32; they differ in summation order and,
# for 16-bit outputs, in the final rounding (the interpreter truncates fp32 -> bf16 instead of
# rounding to nearest). Bounds, relative to max |expected|:
#   fp32: reordering ~200 fp32 additions: far below 5e-5.
#   fp16: one rounding of the result, 2^-11 relative, plus reordering -> 2e-3.
#   bf16: one rounding/truncation step, 2^-8..2^-7 relative -> 1e-2.
REL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [("mixed", torch.float32), ("mixed", torch.float16), ("mixed", torch.bfloat16), ("one_expert", torch.float32)]


def _inputs(case: str, dtype: torch.dtype):
    counts = COUNTS[case]
    E, M = len(counts), sum(counts)
    return dict(offsets=offsets_of(counts), E=E, M=M,
                x=randn(M, D, dtype=dtype, seed=1), dy=randn(M, N, dtype=dtype, seed=2),
                w=randn(E, N, D, dtype=dtype, scale=D ** -0.5, seed=3),
                w13=randn(E, 2 * I, D, dtype=dtype, scale=D ** -0.5, seed=4),
                w2=randn(E, N, I, dtype=dtype, scale=I ** -0.5, seed=5),
                gate_up=randn(M, 2 * I, dtype=dtype, scale=2.0, seed=6))


@pytest.mark.parametrize("case,dtype", CASES)
def test_forward_equals_twin(case, dtype):
    t = _inputs(case, dtype)
    y = tk.grouped_linear(t["x"], t["w"], t["offsets"])
    assert_close(y, reference.grouped_linear(t["x"], t["w"], t["offsets"]), REL[dtype], "y")


@pytest.mark.parametrize("case,dtype", CASES)
def test_dgrad_equals_twin(case, dtype):
    t = _inputs(case, dtype)
    dx = tk.grouped_linear_dgrad(t["dy"], t["w"], t["offsets"])
    assert_close(dx, reference.grouped_linear_dgrad(t["dy"], t["w"], t["offsets"]), REL[dtype], "dx")


@pytest.mark.parametrize("case,dtype", CASES)
def test_wgrad_equals_twin_and_is_zero_for_empty_experts(case, dtype):
    t = _inputs(case, dtype)
    dw = tk.grouped_linear_wgrad(t["dy"], t["x"], t["offsets"], torch.float32)
    assert_close(dw, reference.grouped_linear_wgrad(t["dy"], t["x"], t["offsets"], torch.float32), REL[torch.float32]
                 if dtype == torch.float32 else 1e-5, "dw")
    for e, rows in enumerate(COUNTS[case]):
        if rows == 0:
            assert torch.equal(dw[e], torch.zeros_like(dw[e])), f"expert {e} has no rows but a non-zero gradient"


@pytest.mark.parametrize("case,dtype", CASES)
def test_gate_up_swiglu_equals_twin(case, dtype):
    t = _inputs(case, dtype)
    h, gate_up = tk.gate_up_swiglu(t["x"], t["w13"], t["offsets"])
    h_ref, gate_up_ref = reference.gate_up_swiglu(t["x"], t["w13"], t["offsets"])
    assert_close(h, h_ref, REL[dtype], "h")
    assert_close(gate_up, gate_up_ref, REL[dtype], "gate_up")


@pytest.mark.parametrize("case,dtype", CASES)
def test_swiglu_dgrad_equals_twin(case, dtype):
    t = _inputs(case, dtype)
    d_gate_up, h = tk.swiglu_dgrad(t["dy"], t["w2"], t["gate_up"], t["offsets"])
    d_gate_up_ref, h_ref = reference.swiglu_dgrad(t["dy"], t["w2"], t["gate_up"], t["offsets"])
    assert_close(d_gate_up, d_gate_up_ref, REL[dtype], "d_gate_up")
    assert_close(h, h_ref, REL[dtype], "h (recomputed)")


def test_gate_up_swiglu_without_saving_returns_only_h():
    t = _inputs("one_expert", torch.float32)
    h, gate_up = tk.gate_up_swiglu(t["x"], t["w13"], t["offsets"], save_gate_up=False)
    assert gate_up is None
    assert_close(h, reference.gate_up_swiglu(t["x"], t["w13"], t["offsets"])[0], REL[torch.float32], "h")


def test_strided_operands_are_read_through_their_strides():
    t = _inputs("mixed", torch.float32)
    w_colmajor = t["w"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, K-major storage
    x_wide = torch.zeros(t["M"], 2 * D)
    x_wide[:, ::2] = t["x"]
    x_sliced = x_wide[:, ::2]  # row stride 2 * D, column stride 2
    y = tk.grouped_linear(x_sliced, w_colmajor, t["offsets"])
    assert_close(y, reference.grouped_linear(t["x"], t["w"], t["offsets"]), REL[torch.float32], "y")


def test_no_rows_gives_empty_outputs_and_zero_weight_gradients():
    offsets = torch.zeros(3, dtype=torch.int32)
    x, dy, w = randn(0, D), randn(0, N), randn(3, N, D)
    assert tk.grouped_linear(x, w, offsets).shape == (0, N)
    assert torch.equal(tk.grouped_linear_wgrad(dy, x, offsets), torch.zeros(3, N, D))


def test_bad_inputs_are_rejected_with_the_expected_values():
    t = _inputs("one_expert", torch.float32)
    with pytest.raises(TypeError, match="int32"):
        tk.grouped_linear(t["x"], t["w"], t["offsets"].long())
    with pytest.raises(ValueError, match="offsets has 3 entries for 4 experts"):
        tk.grouped_linear(t["x"], t["w"], t["offsets"][:3])
    with pytest.raises(TypeError, match="one dtype"):
        tk.grouped_linear(t["x"], t["w"].half(), t["offsets"])
    with pytest.raises(ValueError, match=f"rows have {D - 1} features, the weights expect {D}"):
        tk.grouped_linear(t["x"][:, 1:], t["w"], t["offsets"])


def test_offsets_past_the_last_row_are_clamped_not_overrun():
    # offsets[-1] must equal M; checking that would need a host sync, so the kernels clamp row bounds
    # into [0, M] instead: no access outside the tensors (the interpreter would corrupt the heap).
    x, dy, w = randn(20, D, seed=1), randn(20, N, seed=2), randn(3, N, D, scale=D ** -0.5, seed=3)
    offsets = torch.tensor([8, 16, 40], dtype=torch.int32)
    assert_close(tk.grouped_linear(x, w, offsets), reference.grouped_linear(x, w, offsets), REL[torch.float32], "y")
    assert_close(tk.grouped_linear_wgrad(dy, x, offsets), reference.grouped_linear_wgrad(dy, x, offsets),
                 REL[torch.float32], "dw")
