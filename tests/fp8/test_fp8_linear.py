"""Fp8Linear: Fprop, Dgrad and Wgrad against exact (float64) products, within bounds derived from E4M3.

Bound (fp8_cases): every quantized operand element is off by at most E(v) = 2^-4 |v| + 2^-10 s, s its
tile's scale. A product of two quantized operands is then off by at most E_a|b| + |a|E_b + E_a E_b,
and a length-K dot product by the sum of those over K (the worst case: all errors aligned), plus fp32
accumulation (K 2^-24 of the absolute sum). Wgrad's x was quantized twice (1x128 for Fprop, cached,
re-tiled to 128x1), so its E is that of the first rounding plus a second one on the rounded value.
The bound is elementwise, so it also checks the tiling: the inputs' magnitudes change by orders of
magnitude between rows and 128-column blocks, and quantizing them per tensor or with the wrong tiles
sends small tiles into the subnormals, far outside the bound.
"""
import pytest
import torch
from torch import nn

from dsv3.fp8.linear import Fp8Linear
from dsv3.fp8.recipe import Fp8Recipe
from dsv3.kernels import reference
from tests.fp8.fp8_cases import SUB, U, product_bound, quant_error, tile_scale, tiled_randn

M, K, N = 200, 320, 192  # rows straddle a 128-row tile; K = 2.5 tiles; N = 1.5 weight blocks


def _check(name: str, got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: error exceeds the E4M3 bound by {worst:.3g}x"
    # FP8 really ran: the error is a sizeable fraction of what E4M3 allows, not fp32 rounding.
    assert worst > 1e-2, f"{name}: error {worst:.2g} of the bound looks like no quantization happened"


@pytest.mark.parametrize("role,pow2", [("linear_in", False), ("attn_out", True)])
def test_fprop_dgrad_wgrad_within_the_e4m3_bound(role, pow2):
    recipe = Fp8Recipe(pow2_roles=frozenset({"attn_out"}))
    x = tiled_randn(M, K, seed=1).requires_grad_()
    w = tiled_randn(N, K, seed=2, row_block=128) * 0.05
    dy = tiled_randn(M, N, seed=3)
    linear = nn.Linear(K, N, bias=False)
    linear.weight.data.copy_(w)
    fp8 = Fp8Linear(linear, recipe, role)
    y = fp8(x)
    y.backward(dy)

    xd, wd, dyd = x.detach().double(), w.double(), dy.double()
    ex, ew = quant_error(x.detach(), "1x128", pow2), quant_error(w, "128x128")
    _check("y", y, xd @ wd.T, product_bound(xd, ex, wd.T, ew.T))
    _check("dx", x.grad, dyd @ wd, product_bound(dyd, quant_error(dy, "1x128"), wd, ew))
    # x for Wgrad: rounded in 1x128 tiles, then again in 128x1 tiles (scale bounded via |x| + E1).
    ex_cols = ex + U * (xd.abs() + ex) + SUB * tile_scale((xd.abs() + ex).float(), "128x1", pow2)
    _check("dw", fp8.weight.grad, dyd.T @ xd, product_bound(dyd.T, quant_error(dy, "128x1").T, xd, ex_cols))


@pytest.mark.parametrize("pow2_roles", [frozenset(), frozenset({"linear_in", "act_grad", "weight"})])
def test_gemms_are_exactly_the_products_of_the_quantized_operands(pow2_roles):
    """The recipe as a specification: which operand is quantized with which tiles and scales. Products
    of the dequantized operands in fp32 are what the FP8 GEMMs compute, up to fp32 summation order
    (1e-5 of the output scale); a scale off by 1%, a missed power-of-two rounding or a wrong tiling
    each change the result by far more."""
    recipe = Fp8Recipe(pow2_roles=pow2_roles)
    x, w, dy = tiled_randn(M, K, seed=4), tiled_randn(N, K, seed=5, row_block=128), tiled_randn(M, N, seed=6)
    linear = nn.Linear(K, N, bias=False)
    linear.weight.data.copy_(w)
    x.requires_grad_()
    y = Fp8Linear(linear, recipe)(x)
    y.backward(dy)

    def fake(v, tiling, role):
        return reference.dequantize(reference.quantize(v, tiling, pow2_scales=role in pow2_roles), tiling)

    xq = reference.quantize(x.detach(), "1x128", pow2_scales="linear_in" in pow2_roles)
    x_cols = reference.dequantize(reference.requantize(xq, "1x128", "128x1", pow2_scales="linear_in" in pow2_roles),
                                  "128x1")
    wf = fake(w[None], "128x128", "weight")[0]
    for name, got, want in (("y", y, fake(x.detach(), "1x128", "linear_in") @ wf.T),
                            ("dx", x.grad, fake(dy, "1x128", "act_grad") @ wf),
                            ("dw", linear.weight.grad, fake(dy, "128x1", "act_grad").T @ x_cols)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


def test_same_parameters_batched_input_bias_and_dtype():
    linear = nn.Linear(64, 48, bias=True)
    fp8 = Fp8Linear(linear, Fp8Recipe())
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    assert list(dict(fp8.named_parameters())) == ["weight", "bias"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = fp8(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    y.sum().backward()
    assert torch.equal(linear.bias.grad, torch.full((48,), 10.0))  # the bias stays exact
    rel = (y - linear(x)).norm() / linear(x).norm()
    assert 1e-3 < rel < 0.1, rel


def test_frozen_weight_and_no_input_grad():
    linear = nn.Linear(64, 32, bias=False)
    linear.weight.requires_grad_(False)
    x = torch.randn(7, 64, requires_grad=True)
    Fp8Linear(linear, Fp8Recipe())(x).sum().backward()
    assert linear.weight.grad is None and x.grad is not None
    linear.weight.requires_grad_(True)
    Fp8Linear(linear, Fp8Recipe())(torch.randn(7, 64)).sum().backward()
    assert linear.weight.grad is not None
