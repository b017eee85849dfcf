"""The whole expert-parallel data path on the kernels, for R simulated ranks in one process: layout,
permute, exchange (slicing stands in for all_to_all_single), expert-major regroup on the receiver,
per-expert linear maps, return, combine. It must equal the dense computation
out[t] = sum_k w[t,k] * (x[t] @ W[e_tk].T) forward and backward. This is the recipe the expert-parallel
dispatcher follows (module doc of dsv3/kernels/dispatch.py).

Tolerance: the same fp32 products, summed over k in the same order, but each expert's matmul runs on
a different batch of rows than the dense one (BLAS may block differently): a few ulps, so 1e-5.
"""
import pytest
import torch

from dispatch_testing import randn, routing
from dsv3.kernels import dispatch, dispatch_reference

TOL = dict(rtol=1e-5, atol=1e-5)


def segments(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def expert_parallel_moe(xs, topks, ws, weights, n_ranks, align, fp8=False):
    """Per-rank outputs of a routed MoE layer of linear experts, computed the expert-parallel way."""
    n_experts = weights.shape[0]
    epr = n_experts // n_ranks
    layouts = [dispatch.dispatch_layout(t, n_experts, n_ranks) for t in topks]
    if fp8:  # FP8 dispatch: quantized rows and their scales travel, the receiver dequantizes
        sent = [dispatch.permute_fp8(x, lay.send_token) for x, lay in zip(xs, layouts)]
    else:
        sent = [dispatch.permute(x, lay.send_token, lay.token_row) for x, lay in zip(xs, layouts)]

    returned = []  # per receiving rank d: its return rows, source-major
    for d in range(n_ranks):
        blocks = [slice(*segments(lay.rank_offsets)[d]) for lay in layouts]
        recv_topk = torch.cat([lay.send_topk[b] for lay, b in zip(layouts, blocks)])
        em = dispatch.dispatch_layout(recv_topk, epr, epr, align=align)
        if fp8:
            q = torch.cat([s[0][b] for s, b in zip(sent, blocks)])
            scales = torch.cat([s[1][b] for s, b in zip(sent, blocks)])
            q_em = dispatch.gather_rows(q, em.send_token)  # byte copies of FP8 rows and scale rows
            s_em = dispatch.gather_rows(scales, em.send_token)
            x_em = q_em.float() * s_em.repeat_interleave(128, 1)[:, :q.shape[1]]
        else:
            recv_x = torch.cat([s[b] for s, b in zip(sent, blocks)])
            x_em = dispatch.permute(recv_x, em.send_token, em.token_row)
        y_em = torch.cat([x_em[a:b] @ weights[d * epr + e].T for e, (a, b) in enumerate(segments(em.rank_offsets))])
        back = em.pair_row[recv_topk >= 0]
        returned.append(dispatch.permute(y_em, back, dispatch.invert_index(back, len(y_em)).unsqueeze(1)))

    outs = []
    for s, lay in enumerate(layouts):
        # rank d returns, for source s, the block of its return rows that s sent: their count is
        # s's pairs on d, and the earlier sources' blocks come first
        y_back = []
        for d in range(n_ranks):
            before = sum(int(other.pairs_per_rank[d]) for other in layouts[:s])
            y_back.append(returned[d][before:before + int(lay.pairs_per_rank[d])])
        outs.append(dispatch.combine(torch.cat(y_back), lay.pair_pos, lay.pair_src, ws[s]))
    return outs


def dense_moe(x, topk, w, weights):
    out = torch.zeros_like(x)
    for j in range(topk.shape[1]):
        e = topk[:, j]
        y = torch.einsum("th,toh->to", x, weights[e.clamp(min=0)])
        out = torch.where((e >= 0).unsqueeze(1), out + w[:, j:j + 1] * y, out)
    return out


def make_problem(n_ranks, tokens, k=4, n_experts=16, h=48, seed=0):
    xs = [randn(t, h, seed=seed + r).requires_grad_() for r, t in enumerate(tokens)]
    topks = [routing(t, k, n_experts, seed=seed + 10 + r, masked=0.1) for r, t in enumerate(tokens)]
    ws = [randn(t, k, seed=seed + 20 + r).requires_grad_() for r, t in enumerate(tokens)]
    weights = randn(n_experts, h, h, seed=seed + 30).div(h ** 0.5).requires_grad_()
    return xs, topks, ws, weights


@pytest.mark.parametrize("n_ranks,tokens,align", [(2, [33, 20], 1), (4, [17, 0, 29, 1], 8)])
def test_expert_parallel_path_equals_dense_moe_forward_and_backward(n_ranks, tokens, align):
    xs, topks, ws, weights = make_problem(n_ranks, tokens)
    outs = expert_parallel_moe(xs, topks, ws, weights, n_ranks, align)
    grads_out = [randn(*o.shape, seed=99 + i) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, grads_out)
    ep_grads = [t.grad.clone() for t in xs + ws + [weights]]

    for t in xs + ws + [weights]:
        t.grad = None
    dense = [dense_moe(x, t, w, weights) for x, t, w in zip(xs, topks, ws)]
    torch.autograd.backward(dense, grads_out)
    for o, d in zip(outs, dense):
        torch.testing.assert_close(o, d, **TOL)
    for g, t in zip(ep_grads, xs + ws + [weights]):
        torch.testing.assert_close(g, t.grad, **TOL)


def test_fp8_dispatch_path_equals_dense_moe_on_dequantized_tokens():
    """With FP8 dispatch the experts see exactly the dequantized 1x128 tiles of each token."""
    xs, topks, ws, weights = make_problem(2, [25, 18], h=200)
    with torch.no_grad():
        outs = expert_parallel_moe(xs, topks, ws, weights, 2, align=4, fp8=True)
        for x, t, w, o in zip(xs, topks, ws, outs):
            q, s = dispatch_reference.quantize_fp8_1x128(x)
            x_deq = q.float() * s.repeat_interleave(128, 1)[:, :x.shape[1]]
            torch.testing.assert_close(o, dense_moe(x_deq, t, w, weights), **TOL)
