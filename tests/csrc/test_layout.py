"""dispatch_layout: the counting-sort kernel equals its twin, meets its spec, and is deterministic."""
import dataclasses

import pytest
import torch

from dispatch_testing import routing
from dsv3.kernels import dispatch, dispatch_reference

# (name, T, K, E, R, masked fraction, experts to draw from (None: all))
CASES = [
    ("basic", 64, 4, 16, 4, 0.0, None),
    ("no_tokens", 0, 4, 16, 4, 0.0, None),
    ("one_token", 1, 8, 16, 2, 0.0, None),
    ("odd_sizes", 37, 3, 12, 3, 0.0, None),
    ("empty_ranks_and_experts", 45, 4, 16, 4, 0.0, [0, 1, 2, 3, 9, 10, 11]),  # ranks 1, 3 idle
    ("all_k_on_one_rank", 23, 4, 16, 4, 0.0, [4, 5, 6, 7]),
    ("masked_slots", 50, 6, 32, 8, 0.3, None),
    ("fully_masked", 9, 2, 8, 2, 1.0, None),
    ("single_rank", 30, 4, 8, 1, 0.1, None),
    ("rank_per_expert", 41, 3, 8, 8, 0.2, None),  # the receiving side's expert-major regroup
]


def fields(layout):
    return {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}


def assert_layouts_equal(a, b):
    for name, x in fields(a).items():
        y = getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
        assert torch.equal(x, y), f"{name} differs:\n{x}\n{y}"


def assert_meets_spec(lay, topk, n_experts, n_ranks, align):
    """The documented order, checked from first principles (independent of the twin)."""
    n_tokens, k = topk.shape
    epr = n_experts // n_ranks
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lay.rank_offsets[:-1]])
    for r in range(n_ranks):
        seg = lay.send_token[starts[r]:lay.rank_offsets[r]]
        tokens = seg[seg >= 0]
        needs = [t for t in range(n_tokens) if any(e >= 0 and e // epr == r for e in topk[t].tolist())]
        assert tokens.tolist() == needs  # each needed token once, in token order
        assert (seg[len(tokens):] == -1).all() and len(seg) % align == 0  # padding at the end
        assert lay.tokens_per_rank[r] == len(needs)
    assert torch.equal(lay.tokens_per_expert, torch.bincount(topk[topk >= 0], minlength=n_experts))
    for t in range(n_tokens):
        for r in range(n_ranks):
            row = lay.token_row[t, r]
            assert (row >= 0) == lay.token_in_rank[t, r] and (row < 0 or lay.send_token[row] == t)
        for j in range(k):
            e = topk[t, j].item()
            if e < 0:
                assert lay.pair_pos[t, j] == -1 and lay.pair_row[t, j] == -1
                continue
            assert lay.pair_src[lay.pair_pos[t, j]] == t * k + j
            assert lay.pair_row[t, j] == lay.token_row[t, e // epr]
            assert lay.send_topk[lay.pair_row[t, j], j] == e % epr
    # the return buffer is ordered by (rank, t, k)
    rank_of = torch.div(topk.flatten()[lay.pair_src], epr, rounding_mode="floor")
    keys = rank_of * max(n_tokens * k, 1) + lay.pair_src
    assert (keys[1:] > keys[:-1]).all()


@pytest.mark.parametrize("align", [1, 3, 128])
@pytest.mark.parametrize("name,n_tokens,k,n_experts,n_ranks,masked,experts", CASES, ids=[c[0] for c in CASES])
def test_layout_matches_twin_and_spec(name, n_tokens, k, n_experts, n_ranks, masked, experts, align):
    topk = routing(n_tokens, k, n_experts, seed=n_tokens + k, masked=masked, experts=experts)
    lay = dispatch.dispatch_layout(topk, n_experts, n_ranks, align=align, chunk=8)
    assert_layouts_equal(lay, dispatch_reference.dispatch_layout(topk, n_experts, n_ranks, align=align))
    assert_meets_spec(lay, topk, n_experts, n_ranks, align)


def test_layout_is_bit_identical_across_runs_threads_and_chunks():
    topk = routing(3000, 8, 64, seed=1, masked=0.1)
    first = dispatch.dispatch_layout(topk, 64, 8)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for chunk in (1, 7, 256, 4096):
                assert_layouts_equal(dispatch.dispatch_layout(topk, 64, 8, chunk=chunk), first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("value,message", [(16, "is not an expert id"), (-2, "is not an expert id"),
                                           ("repeat", "twice")])
def test_layout_rejects_bad_expert_ids(value, message):
    topk = routing(20, 4, 16, seed=3)
    topk[11, 2] = topk[11, 0] if value == "repeat" else value
    with pytest.raises(RuntimeError, match=message) as err:
        dispatch.dispatch_layout(topk, 16, 4)
    assert "topk_idx[11" in str(err.value)


def test_layout_rejects_bad_arguments():
    topk = routing(8, 2, 16, seed=4)
    with pytest.raises(RuntimeError, match="divide n_experts=16"):
        dispatch.dispatch_layout(topk, 16, 3)
    with pytest.raises(RuntimeError, match="align must be >= 1"):
        dispatch.dispatch_layout(topk, 16, 4, align=0)
    with pytest.raises(RuntimeError, match="must be int64, got Int"):
        dispatch.dispatch_layout(topk.int(), 16, 4)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        dispatch.dispatch_layout(topk.flatten(), 16, 4)
