"""Fp8Linear on the GPU's E4M3 tensor cores equals the CPU emulation of the recipe (dequantize, fp32
matmul) on the same inputs: Fprop, Dgrad and Wgrad. Both multiply the same quantized operands exactly
and accumulate in fp32 in another order: 1e-5 of the output scale for fp32 outputs. With BF16 inputs
(a GPU run's autocast) the outputs are BF16: one rounding more, 2^-8 -> 1e-2. That the emulation is
within E4M3's error bound of the exact float64 products is tests/fp8/test_fp8_linear.py's job.
"""
import pytest
import torch
from conftest import DEVICE, needs_fp8
from torch import nn

from dsv3.fp8.linear import Fp8Linear
from dsv3.fp8.recipe import Fp8Recipe, backend_for
from tests.fp8.fp8_cases import tiled_randn

M, K, N = 200, 320, 192  # rows straddle a 128-row tile; K = 2.5 tiles; N = 1.5 weight blocks


def _run(recipe: Fp8Recipe, device, dtype, x, w, dy):
    linear = nn.Linear(K, N, bias=False).to(device)
    linear.weight.data.copy_(w)
    xx = x.to(device, dtype).requires_grad_()
    y = Fp8Linear(linear, recipe)(xx)
    y.backward(dy.to(device, dtype))
    return [t.detach().float().cpu() for t in (y, xx.grad, linear.weight.grad)]


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_linear_on_gpu_equals_cpu_emulation(dtype, pow2):
    roles = frozenset({"linear_in", "act_grad", "weight"}) if pow2 else frozenset()
    x, w, dy = tiled_randn(M, K, seed=1), tiled_randn(N, K, seed=2, row_block=128) * 0.05, tiled_randn(M, N, seed=3)
    got = _run(Fp8Recipe(backend=backend_for("triton"), pow2_roles=roles), DEVICE, dtype, x, w, dy)
    want = _run(Fp8Recipe(pow2_roles=roles), "cpu", dtype, x, w, dy)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} x {scale:.3g}"
