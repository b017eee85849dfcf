"""Fp8Linear on the GPU's E4M3 tensor cores equals the CPU emulation of the recipe (dequantize, fp32
matmul) on the same inputs: Fprop, Dgrad and Wgrad. Both multiply the same quantized operands exactly;
they differ in accumulation: the tensor cores keep ~14 bits inside each 128-long K block (see
`assert_within_fp8_accumulation`), the emulation sums in fp32. With BF16 inputs (a GPU run's
autocast) y and dx are BF16: one rounding more. That the emulation is within E4M3's error bound of
the exact float64 products is tests/fp8/test_fp8_linear.py's job.
"""
import pytest
import torch
from conftest import DEVICE, needs_fp8
from torch import nn

from test_triton_kernels_cuda import _abs, assert_within_fp8_accumulation

from dsv3.fp8.linear import Fp8Linear, one_expert
from dsv3.fp8.recipe import Fp8Recipe, backend_for
from dsv3.kernels import reference as ref
from tests.fp8.fp8_cases import tiled_randn

M, K, N = 200, 320, 192  # rows straddle a 128-row tile; K = 2.5 tiles; N = 1.5 weight blocks


def _run(recipe: Fp8Recipe, device, dtype, x, w, dy):
    linear = nn.Linear(K, N, bias=False).to(device)
    linear.weight.data.copy_(w)
    xx = x.to(device, dtype).requires_grad_()
    y = Fp8Linear(linear, recipe)(xx)
    y.backward(dy.to(device, dtype))
    return [t.detach().cpu() for t in (y, xx.grad, linear.weight.grad)]


def _abs_products(recipe: Fp8Recipe, dtype, x, w, dy):
    """sum_k |a_k b_k| of the three GEMMs, over the operands the recipe quantizes (roles as Fp8Linear's)."""
    x, dy = x.to(dtype), dy.to(dtype)
    xq, wq = recipe.quantize(x, "1x128", "linear_in"), recipe.quantize(w[None], "128x128", "weight")
    off = one_expert(x)
    y = ref.grouped_linear(_abs(xq), _abs(wq), off, torch.float32)
    dx = ref.grouped_linear_dgrad(_abs(recipe.quantize(dy, "1x128", "act_grad")), _abs(wq), off, torch.float32)
    dw = ref.grouped_linear_wgrad(_abs(recipe.quantize(dy, "128x1", "act_grad")),
                                  _abs(recipe.to_columns(xq, "linear_in")), off, torch.float32)[0]
    return y, dx, dw


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_linear_on_gpu_equals_cpu_emulation(dtype, pow2):
    roles = frozenset({"linear_in", "act_grad", "weight"}) if pow2 else frozenset()
    x, w, dy = tiled_randn(M, K, seed=1), tiled_randn(N, K, seed=2, row_block=128) * 0.05, tiled_randn(M, N, seed=3)
    got = _run(Fp8Recipe(backend=backend_for("triton"), pow2_roles=roles), DEVICE, dtype, x, w, dy)
    want = _run(Fp8Recipe(pow2_roles=roles), "cpu", dtype, x, w, dy)
    bounds = _abs_products(Fp8Recipe(pow2_roles=roles), dtype, x, w, dy)
    for name, a, b, products in zip(("y", "dx", "dw"), got, want, bounds):
        assert_within_fp8_accumulation(a, b, products, name)
