"""combine, its backward pieces and invert_index against their twins.

combine and the gather-form backward of y are exact: both sides add the same fp32 products in slot
order j = 0, 1, ... (the host build has no fused multiply-add, see setup.py) and round once. The
weight gradient is a dot product over the hidden dim that the twin sums in another order; the
difference is bounded by 2 (H + 1) u sum_c |g_c y_c| with u = 2^-24 (fp32 rounding of each product
and of the running sums on both sides).
"""
import pytest
import torch

from dispatch_testing import randn, routing
from dsv3.kernels import dispatch, dispatch_reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def return_layout(n_tokens, k=4, n_experts=16, n_ranks=4, seed=0, masked=0.2):
    topk = routing(n_tokens, k, n_experts, seed=seed, masked=masked)
    return dispatch.dispatch_layout(topk, n_experts, n_ranks)


@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("n_tokens,h", [(45, 300), (1, 7), (0, 16), (5, 0)])
def test_combine_matches_twin(in_dtype, out_dtype, n_tokens, h):
    lay = return_layout(n_tokens)
    y = randn(len(lay.pair_src), h, dtype=in_dtype, seed=1)
    w = randn(n_tokens, 4, seed=2)
    for weights in (w, None):
        out = dispatch.combine(y, lay.pair_pos, lay.pair_src, weights, out_dtype)
        assert out.dtype == out_dtype and out.shape == (n_tokens, h)
        assert torch.equal(out, dispatch_reference.combine(y, lay.pair_pos, None, weights, out_dtype))


@pytest.mark.parametrize("y_dtype", FLOATS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_combine_backward_matches_twin(y_dtype, grad_dtype):
    n_tokens, h = 45, 260
    lay = return_layout(n_tokens, seed=3)
    y = randn(len(lay.pair_src), h, dtype=y_dtype, seed=4)
    w, grad = randn(n_tokens, 4, seed=5), randn(n_tokens, h, dtype=grad_dtype, seed=6)
    dy, dw = dispatch.combine_backward(grad, y, lay.pair_pos, lay.pair_src, w)
    dy_ref, dw_ref = dispatch_reference.combine_backward(grad, y, lay.pair_pos, None, w)
    assert dy.dtype == y_dtype and torch.equal(dy, dy_ref)
    products = (grad.float().unsqueeze(1) * dispatch_reference.gather_rows(y, lay.pair_pos.flatten())
                .float().view(n_tokens, 4, h)).abs().sum(-1)
    assert ((dw - dw_ref).abs() <= 2 * (h + 1) * 2**-24 * products).all()
    assert (dw[lay.pair_pos < 0] == 0).all()


def test_permute_backward_is_the_scatter_add_of_the_send_rows():
    lay = dispatch.dispatch_layout(routing(50, 6, 32, seed=7, masked=0.1), 32, 8)
    grad = randn(len(lay.send_token), 130, dtype=torch.bfloat16, seed=8)
    dx = dispatch.permute_backward(grad, lay.token_row)
    assert torch.equal(dx, dispatch_reference.permute_backward(grad, lay.token_row))
    scatter = torch.zeros(50, 130).index_add_(0, lay.send_token, grad.float())  # no padding at align 1
    torch.testing.assert_close(dx.float(), scatter, rtol=2**-7, atol=0)  # one bf16 rounding (2^-8) + fp32 order


def test_invert_index_matches_twin_and_rejects_non_invertible():
    lay = return_layout(40, seed=9)
    n = len(lay.pair_src)
    inverse = dispatch.invert_index(lay.pair_pos, n)
    assert torch.equal(inverse, lay.pair_src)
    assert torch.equal(inverse, dispatch_reference.invert_index(lay.pair_pos, n))
    assert torch.equal(dispatch.invert_index(torch.tensor([-1, 2]), 4), torch.tensor([-1, -1, 1, -1]))
    with pytest.raises(RuntimeError, match="row 3 is named by more than one entry"):
        dispatch.invert_index(torch.tensor([[0, 3], [3, -1], [1, 3]]), 4)
    with pytest.raises(RuntimeError, match=r"entry 1 \(flat\) = 4 is not a row; accepted: 0..3"):
        dispatch.invert_index(torch.tensor([0, 4]), 4)


def test_combine_rejects_bad_arguments():
    y, index = randn(6, 8), torch.tensor([[0, 5], [6, -1]])
    with pytest.raises(RuntimeError, match=r"index\[1, 0\] = 6 is not a row of y; accepted: 0..5"):
        dispatch.combine(y, index, torch.full((6,), -1))
    with pytest.raises(RuntimeError, match="weights must be float32 with the shape of index"):
        dispatch.combine(y, index.clamp(max=5), torch.full((6,), -1), torch.ones(2, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="inverse has 5 rows but y has 6"):
        dispatch.combine(y, index.clamp(max=5), torch.full((5,), -1))
