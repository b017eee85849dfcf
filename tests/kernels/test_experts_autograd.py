"""Gradients through `ops` with impl="triton" (interpreter) equal those of the reference path."""
import pytest
import torch
from kernel_cases import assert_close, offsets_of, randn

from dsv3.kernels import ops

# fp32: the kernels and the reference both compute in fp32 and differ in summation order only.
# bf16: the fused path rounds differently from torch autograd on the reference (e.g. h from the fp32
# projection vs from the rounded one, gradients rounded to bf16 between GEMMs): a few bf16 steps
# (2^-8 relative each) -> 3e-2.
REL = {torch.float32: 5e-5, torch.bfloat16: 3e-2}


# Smaller than the GEMM tests' shapes (each case runs 6 GEMMs): still an empty expert, a 1-row
# expert, 129 rows (two row tiles) and dims that are not multiples of the 128 blocks.
COUNTS_SMALL = [0, 129, 1, 0, 37]
D, I = 120, 48


def _leaves(dtype: torch.dtype):
    counts = COUNTS_SMALL
    E, M = len(counts), sum(counts)
    x = randn(M, D, dtype=dtype, seed=1).requires_grad_()
    w13 = randn(E, 2 * I, D, dtype=dtype, scale=D ** -0.5, seed=2).requires_grad_()
    w2 = randn(E, D, I, dtype=dtype, scale=I ** -0.5, seed=3).requires_grad_()
    return offsets_of(counts), x, w13, w2, randn(M, D, dtype=dtype, seed=4)


def _value_and_grads(fn, inputs, dy):
    y = fn(*inputs)
    return (y, *torch.autograd.grad(y, inputs, dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_swiglu_mlp_triton_gradients_equal_reference(dtype):
    offsets, x, w13, w2, dy = _leaves(dtype)
    got = _value_and_grads(lambda *a: ops.expert_swiglu_mlp(*a, offsets, "triton"), (x, w13, w2), dy)
    want = _value_and_grads(lambda *a: ops.expert_swiglu_mlp(*a, offsets, "reference"), (x, w13, w2), dy)
    for name, a, b in zip(("y", "dx", "dw13", "dw2"), got, want):
        assert_close(a, b, REL[dtype], name)


def test_grouped_linear_triton_gradients_equal_reference():
    offsets, x, w13, _, _ = _leaves(torch.float32)
    dy = randn(x.shape[0], 2 * I, seed=5)
    got = _value_and_grads(lambda *a: ops.grouped_linear(*a, offsets, "triton"), (x, w13), dy)
    want = _value_and_grads(lambda *a: ops.grouped_linear(*a, offsets, "reference"), (x, w13), dy)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert_close(a, b, REL[torch.float32], name)


def test_triton_resolves_in_the_interpreter_on_cpu():
    assert ops.resolve_grouped_gemm_impl("triton", "cpu", torch.bfloat16) == "triton"
    assert ops.resolve_grouped_gemm_impl("triton", "cpu", torch.bfloat16, fp8=True) == "triton"


def test_expanded_incoming_gradients_and_frozen_weights():
    # `.sum()` hands backward a zero-stride gradient (the kernels read it through its strides);
    # gradients are computed only for the inputs that need them.
    offsets = offsets_of([0, 3, 0, 37])
    x, w13, w2 = randn(40, 32, seed=1).requires_grad_(), randn(4, 32, 32, seed=2), randn(4, 32, 16, seed=3)
    w2.requires_grad_()
    ops.expert_swiglu_mlp(x, w13, w2, offsets, "triton").sum().backward()
    want = torch.autograd.grad(ops.expert_swiglu_mlp(x, w13, w2, offsets, "reference").sum(), (x, w2))
    assert w13.grad is None
    assert_close(x.grad, want[0], REL[torch.float32], "dx")
    assert_close(w2.grad, want[1], REL[torch.float32], "dw2")
