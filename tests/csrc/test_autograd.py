"""permute/combine autograd (backward through the inverse indices) against the twins' autograd
(torch's own indexing backward: a scatter-add), in fp32.

Tolerance: both sides sum the same fp32 terms, at most max(K, R) of them per element, possibly in a
different order (index_add vs slot order), so they differ by a few fp32 ulps; the weight gradient is
a length-H dot product (bound in test_combine.py). rtol 1e-5 with atol 1e-5 covers both at these sizes
and is far below any indexing or weighting mistake, which changes values by O(1).
"""
import torch

from dispatch_testing import randn, routing
from dsv3.kernels import dispatch, dispatch_reference

TOL = dict(rtol=1e-5, atol=1e-5)


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    g = randn(*out.shape, seed=42)
    (out * g).sum().backward()
    return out, [t.grad for t in inputs if t.requires_grad]


def test_permute_autograd_matches_twin():
    lay = dispatch.dispatch_layout(routing(53, 6, 32, seed=1, masked=0.15), 32, 8)
    x = randn(53, 96, seed=2)
    out, (dx,) = grads(lambda x: dispatch.permute(x, lay.send_token, lay.token_row), x)
    out_ref, (dx_ref,) = grads(lambda x: dispatch_reference.permute(x, lay.send_token, lay.token_row), x)
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(dx, dx_ref, **TOL)


def test_permute_autograd_with_padding_rows_matches_twin():
    lay = dispatch.dispatch_layout(routing(29, 3, 8, seed=3), 8, 8, align=4)  # expert-major, padded
    x = randn(29, 40, seed=4)
    _, (dx,) = grads(lambda x: dispatch.permute(x, lay.send_token, lay.token_row), x)
    _, (dx_ref,) = grads(lambda x: dispatch_reference.permute(x, lay.send_token, None), x)
    torch.testing.assert_close(dx, dx_ref, **TOL)


def test_combine_autograd_matches_twin_for_y_and_weights():
    topk = routing(47, 4, 16, seed=5, masked=0.2)
    lay = dispatch.dispatch_layout(topk, 16, 4)
    y, w = randn(len(lay.pair_src), 72, seed=6), randn(47, 4, seed=7)
    out, (dy, dw) = grads(lambda y, w: dispatch.combine(y, lay.pair_pos, lay.pair_src, w), y, w)
    out_ref, (dy_ref, dw_ref) = grads(lambda y, w: dispatch_reference.combine(y, lay.pair_pos, None, w), y, w)
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(dy, dy_ref, **TOL)
    torch.testing.assert_close(dw, dw_ref, **TOL)


def test_combine_autograd_without_weights_and_with_bf16_rows():
    lay = dispatch.dispatch_layout(routing(31, 3, 12, seed=8), 12, 3)
    y = randn(len(lay.pair_src), 24, seed=9, dtype=torch.bfloat16)
    _, (dy,) = grads(lambda y: dispatch.combine(y, lay.pair_pos, lay.pair_src, None, torch.float32), y)
    _, (dy_ref,) = grads(lambda y: dispatch_reference.combine(y, lay.pair_pos, None, None, torch.float32), y)
    assert dy.dtype == torch.bfloat16
    assert torch.equal(dy, dy_ref)  # each dy row is one grad row rounded to bf16: no sum, exact
