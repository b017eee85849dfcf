"""The FP8 SwiGLU path (routed experts, shared experts, dense FFNs): the recipe exactly, and its
distance from fp32, with the awkward expert shapes (empty experts, a single row, one expert taking all
rows, rows straddling the 128-row tiles of Wgrad)."""
import pytest
import torch
from torch import nn

from dsv3.fp8.recipe import Fp8Recipe
from dsv3.fp8.swiglu import Fp8Experts, Fp8FeedForward, Fp8SwiGLUFunction
from dsv3.kernels import ops, reference
from dsv3.kernels.fp8_format import attach_fp8
from dsv3.model.moe import Experts, FeedForward

COUNTS = {"mixed": [0, 200, 1, 0, 37], "one_expert": [0, 0, 300, 0]}
D, I = 160, 96  # K not a multiple of 128; gate/up halves of 96 rows: the weight blocks straddle them


def offsets_of(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def leaves(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)
    x = torch.randn(M, D, generator=g).requires_grad_()
    w13 = (torch.randn(E, 2 * I, D, generator=g) * D ** -0.5).requires_grad_()
    w2 = (torch.randn(E, D, I, generator=g) * I ** -0.5).requires_grad_()
    return x, w13, w2, torch.randn(M, D, generator=g)


def fp8_mlp(recipe, x, w13, w2, offsets, dy):
    y = Fp8SwiGLUFunction.apply(x, w13, w2, offsets, recipe, "expert_in", "expert_out_grad", None)
    return (y, *torch.autograd.grad(y, (x, w13, w2), dy))


def recipe_spec(x, w13, w2, offsets, dy, pow2):
    """The recipe written out with fake quantization (quantize -> dequantize) and fp32 products, one
    expert at a time. 128x1 tiles run over the global rows, as in the kernels."""
    def fq(v, tiling, role):
        return reference.dequantize(reference.quantize(v, tiling, pow2_scales=role in pow2), tiling)

    x, w13, w2 = x.detach(), w13.detach(), w2.detach()
    bounds = reference.expert_bounds(offsets)
    xt, w13t, w2t = fq(x, "1x128", "expert_in"), fq(w13, "128x128", "weight"), fq(w2, "128x128", "weight")
    gate_up = torch.cat([xt[a:b] @ w13t[e].T for e, (a, b) in enumerate(bounds)])
    ht = fq(reference.swiglu(gate_up), "1x128", "linear_in")
    y = torch.cat([ht[a:b] @ w2t[e].T for e, (a, b) in enumerate(bounds)])
    # Backward: SwiGLU recomputed from its FP8-cached input.
    dyt = fq(dy, "1x128", "expert_out_grad")
    dh = torch.cat([dyt[a:b] @ w2t[e] for e, (a, b) in enumerate(bounds)])
    d_gate_up, h = reference.swiglu_backward(fq(gate_up, "1x128", "swiglu_in"), dh)
    dy_cols, h_cols = fq(dy, "128x1", "expert_out_grad"), fq(h, "128x1", "linear_in")
    dgu_rows, dgu_cols = fq(d_gate_up, "1x128", "act_grad"), fq(d_gate_up, "128x1", "act_grad")
    xq = reference.quantize(x, "1x128", pow2_scales="expert_in" in pow2)
    x_cols = reference.dequantize(reference.requantize(xq, "1x128", "128x1", pow2_scales="expert_in" in pow2), "128x1")
    dx = torch.cat([dgu_rows[a:b] @ w13t[e] for e, (a, b) in enumerate(bounds)])
    dw13 = torch.stack([dgu_cols[a:b].T @ x_cols[a:b] for a, b in bounds])
    dw2 = torch.stack([dy_cols[a:b].T @ h_cols[a:b] for a, b in bounds])
    return y, dx, dw13, dw2


@pytest.mark.parametrize("case", COUNTS)
@pytest.mark.parametrize("pow2", [frozenset({"expert_in", "expert_out_grad"}), frozenset({"swiglu_in", "act_grad"})])
def test_fp8_experts_compute_exactly_the_recipe(case, pow2):
    """Which tensor is quantized where, with which tiles and scales, and what backward recomputes:
    equal to the written-out recipe up to fp32 summation order (1e-5 of each output's scale)."""
    x, w13, w2, dy = leaves(COUNTS[case])
    offsets = offsets_of(COUNTS[case])
    got = fp8_mlp(Fp8Recipe(pow2_roles=pow2), x, w13, w2, offsets, dy)
    want = recipe_spec(x, w13, w2, offsets, dy, pow2)
    for name, a, b in zip(("y", "dx", "dw13", "dw2"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


# Distance from fp32. A quantized operand carries relative rounding errors of at most u = 2^-4, uniform
# within half an ulp: an RMS of at most u/sqrt(3) = 0.036 per element (at the worst mantissa). Independent
# errors of the n quantized operands on an output's path add in quadrature, like the products of the
# sums themselves: y passes 4 (x, W13, h, W2), the gradients up to 7 (plus dy, the cached SwiGLU input,
# d_gate_up): sqrt(7) * 0.036 = 0.095 -> 0.1 relative Frobenius error. Below 0.005 the path did not
# quantize at all (measured here: 0.06-0.075).
FP32_REL = 0.1


@pytest.mark.parametrize("case", COUNTS)
def test_fp8_experts_stay_close_to_fp32(case):
    x, w13, w2, dy = leaves(COUNTS[case], seed=1)
    offsets = offsets_of(COUNTS[case])
    got = fp8_mlp(Fp8Recipe(), x, w13, w2, offsets, dy)
    y = ops.expert_swiglu_mlp(x, w13, w2, offsets, "reference")
    want = (y, *torch.autograd.grad(y, (x, w13, w2), dy))
    for name, a, b in zip(("y", "dx", "dw13", "dw2"), got, want):
        rel = ((a - b).norm() / b.norm()).item()
        assert 0.005 < rel < FP32_REL, f"{name}: relative error {rel:.3g} vs fp32"
    empty = [e for e, n in enumerate(COUNTS[case]) if n == 0]
    assert not got[2][empty].any() and not got[3][empty].any(), "an expert without rows got a weight gradient"


def test_experts_use_attached_fp8_rows_as_they_are():
    """Rows handed over by an FP8 dispatch carry their FP8 form: the experts compute on it without
    quantizing x again (counted), with the result of quantizing x themselves (power-of-two expert_in
    scales, the dispatch's format), bit for bit."""
    counts = COUNTS["mixed"]
    x, w13, w2, dy = leaves(counts, seed=2)
    experts = Experts(len(counts), D, I)
    experts.w13.data.copy_(w13.detach()), experts.w2.data.copy_(w2.detach())
    offsets = offsets_of(counts)
    roles = []

    class Counting(Fp8Recipe):
        def quantize(self, v, tiling, role):
            roles.append(role)
            return super().quantize(v, tiling, role)

    fp8 = Fp8Experts(experts, Counting())
    own = fp8(x, offsets)
    assert roles.count("expert_in") == 1
    rows = x.detach().clone().requires_grad_()
    attach_fp8(rows, reference.quantize(rows.detach(), "1x128", pow2_scales=True))
    roles.clear()
    attached = fp8(rows, offsets)
    assert "expert_in" not in roles
    assert torch.equal(own, attached)
    assert torch.equal(torch.autograd.grad(own, x, dy)[0], torch.autograd.grad(attached, rows, dy)[0])


def test_fp8_ffn_keeps_w1_w2_w3_and_splits_their_gradients():
    """Dense/shared FFNs run as one FP8 expert on [w1; w3]: the gradients still reach w1 and w3 (not
    swapped: each is compared with fp32's), the parameters are the same objects."""
    torch.manual_seed(3)
    ffn = FeedForward(96, 160)
    fp8 = Fp8FeedForward(ffn, Fp8Recipe())
    assert fp8.w1 is ffn.w1 and fp8.w2 is ffn.w2 and fp8.w3 is ffn.w3
    assert [n for n, _ in fp8.named_parameters()] == [n for n, _ in ffn.named_parameters()]
    x = torch.randn(3, 70, 96)
    params = [ffn.w1.weight, ffn.w2.weight, ffn.w3.weight]
    got = torch.autograd.grad(fp8(x).square().sum(), params)
    want = torch.autograd.grad(FeedForward.forward(ffn, x).square().sum(), params)
    for name, a, b in zip(("w1", "w2", "w3"), got, want):
        rel = ((a - b).norm() / b.norm()).item()
        assert 0.005 < rel < FP32_REL, f"d{name}: relative error {rel:.3g} vs fp32"
    assert fp8(x).shape == x.shape and isinstance(fp8, nn.Module)
