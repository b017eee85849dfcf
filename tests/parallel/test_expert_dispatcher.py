"""The expert-parallel dispatcher equals the local one: for 2 and 4 gloo ranks, the MoE's routed output
and the gradients of the tokens, the routing weights' router and the experts are those of the
LocalTokenDispatcher running every rank's tokens through all experts in one process. Edge cases: a
rank that receives no tokens, a rank with no tokens of its own, an expert that gets none, a token
whose experts all live on one rank, padding of the expert rows (align > 1).

Tolerance: the same fp32 products and the same k-ordered fp32 sums, but each expert's GEMM runs on a
different batch of rows than in the local run (BLAS may block differently): a few ulps of O(1)
values, so 1e-5 relative and absolute.
"""
import torch
import torch.distributed as dist

from dsv3.kernels.dispatch_reference import quantize_fp8_1x128
from dsv3.model.init import init_weights
from dsv3.model.moe import Experts, LocalTokenDispatcher
from dsv3.parallel.expert_parallel import ExpertParallelDispatcher
from tests.parallel.distributed_testing import run_workers

TOL = dict(rtol=1e-5, atol=1e-5)
# FP8 dispatch: both sides round the expert outputs (and their gradients) to BF16 at the same points, but
# from fp32 values a few ulps apart, so an element may round to the neighbouring BF16 value: 2^-8 relative.
TOL_FP8 = dict(rtol=2 ** -7, atol=2 ** -7)
DIM, INTER = 16, 8


def routing(n_tokens: int, k: int, pool: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(pool)
    return pool[torch.rand(n_tokens, len(pool), generator=g).topk(k, dim=1).indices]


def make_inputs(rank: int, scenario: dict, dim: int = DIM):
    """Rank `rank`'s tokens, routing and output gradient (every rank can rebuild any rank's)."""
    n = scenario["tokens"][rank]
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, dim, generator=g)
    idx = routing(n, scenario["k"], scenario["pool"], seed=200 + rank)
    for t, experts in scenario["forced"].items():  # a token's experts chosen by the scenario
        if t < n:
            idx[t] = torch.tensor(experts)
    return x, idx, torch.randn(n, dim, generator=g)


def routed_moe(dispatcher, experts, x, idx, router, fp8_reference=False):
    """The MoE's routed part as the model runs it: weights from the router, dispatch, experts, combine."""
    w = torch.sigmoid(x @ router.T).gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    x_in = x
    if fp8_reference:  # what FP8 dispatch delivers to the experts: the dequantized 1x128 tiles
        q, s = quantize_fp8_1x128(x.detach())
        x_deq = (q.float() * s.repeat_interleave(128, 1)[:, :x.shape[1]])
        x_in = x_deq + (x - x.detach())  # exactly x_deq, with the identity's gradient (straight-through)
    rows, offsets, state = dispatcher.dispatch(x_in, idx)
    y = experts(rows, offsets)
    if fp8_reference:  # FP8 dispatch sends the expert outputs back in BF16 (and their gradients)
        y = y.to(torch.bfloat16).float()
    return dispatcher.combine(y, w, state)


def build_experts(scenario: dict, n_ranks: int, rank: int, dim: int):
    """All experts (the reference) and this rank's slice, both from the plan-independent init."""
    full = Experts(scenario["experts"], dim, INTER)
    init_weights(full, seed=7, std=dim ** -0.5)  # O(1) activations at any dim
    local = Experts(scenario["experts"] // n_ranks, dim, INTER)
    local.expert_offset = rank * local.w13.shape[0]
    init_weights(local, seed=7, std=dim ** -0.5)
    return full, local


def dispatcher_worker(rank: int, world: int, scenario: dict, fp8: bool = False) -> None:
    dim = scenario.get("dim", DIM)
    n_experts = scenario["experts"]
    full, local = build_experts(scenario, world, rank, dim)
    router = torch.randn(n_experts, dim, generator=torch.Generator().manual_seed(5)) * dim ** -0.5
    ep = ExpertParallelDispatcher(dist.group.WORLD, n_experts, align=scenario["align"], fp8=fp8)

    def run_ep():
        x, idx, grad_out = make_inputs(rank, scenario, dim)
        x.requires_grad_()
        r = router.clone().requires_grad_()
        local.zero_grad()
        out = routed_moe(ep, local, x, idx, r)
        (out * grad_out).sum().backward()
        return [out.detach(), x.grad, r.grad, local.w13.grad.clone(), local.w2.grad.clone()]

    got = run_ep()
    again = run_ep()
    for a, b in zip(got, again):  # deterministic: bit for bit
        assert torch.equal(a, b)

    # Reference: every rank's tokens through all experts in one process, the local dispatcher.
    lo, hi = local.expert_offset, local.expert_offset + local.w13.shape[0]
    r = router.clone().requires_grad_()
    total = 0.0
    for src in range(world):
        x, idx, grad_out = make_inputs(src, scenario, dim)
        if x.shape[0] == 0:
            continue
        x.requires_grad_(src == rank)
        out = routed_moe(LocalTokenDispatcher(n_experts), full, x, idx, r, fp8_reference=fp8)
        loss = (out * grad_out).sum()
        if src == rank:  # the router's gradient on this rank comes from this rank's tokens only
            want_out, (want_dx, want_router) = out.detach(), torch.autograd.grad(loss, [x, r], retain_graph=True)
        total = total + loss
    want_experts = torch.autograd.grad(total, [full.w13, full.w2])
    names = ["output", "input grad", "router grad", "w13 grad", "w2 grad"]
    if scenario["tokens"][rank] == 0:
        assert got[0].shape == (0, dim) and got[1].shape == (0, dim) and not got[2].any()
        got, names, wants = got[3:], names[3:], []
    else:
        wants = [want_out, want_dx, want_router]
    wants += [want_experts[0][lo:hi], want_experts[1][lo:hi]]
    for name, a, b in zip(names, got, wants):
        torch.testing.assert_close(a, b, **(TOL_FP8 if fp8 else TOL), msg=lambda m: f"rank {rank}: {name}: {m}")


def test_two_ranks_equal_the_local_dispatcher():
    """Expert 2 gets no token; token 0 of every rank uses experts 4, 5, 6, all on rank 1."""
    scenario = dict(experts=8, k=3, tokens=[13, 7], pool=[0, 1, 3, 4, 5, 6, 7], forced={0: [4, 5, 6]}, align=1)
    run_workers(dispatcher_worker, 2, scenario)


def test_four_ranks_equal_the_local_dispatcher_with_padding_and_empty_ranks():
    """Rank 3 (experts 6, 7) receives nothing, rank 1 has no tokens, expert 1 gets none, token 0 uses
    experts 2 and 3 (both on rank 1); expert rows are padded to multiples of 4."""
    scenario = dict(experts=8, k=2, tokens=[9, 0, 5, 3], pool=[0, 2, 3, 4, 5], forced={0: [2, 3]}, align=4)
    run_workers(dispatcher_worker, 4, scenario)


def test_fp8_dispatch_delivers_the_dequantized_tokens_and_a_straight_through_gradient():
    """With FP8 dispatch the experts see each token's 1x128 FP8 tiles dequantized (dim 160: one full
    and one narrow tile), the token gradient returns unquantized as if dispatch were the identity, and the
    expert outputs come back in BF16."""
    scenario = dict(experts=8, k=2, tokens=[11, 6], pool=list(range(8)), forced={}, align=1, dim=160)
    run_workers(dispatcher_worker, 2, scenario, True)


def test_node_limited_routing_reaches_at_most_n_limited_groups_ranks():
    """With one expert group per EP rank (groups contiguous, experts contiguous per rank), group-limited
    routing is node-limited routing: a token's destination ranks are at most n_limited_groups."""
    from dsv3.config.schema import ModelConfig
    from dsv3.kernels.dispatch import dispatch_layout
    from dsv3.model.moe import Gate

    ep = 4
    cfg = ModelConfig(dim=32, n_routed_experts=16, n_activated_experts=4, n_expert_groups=ep, n_limited_groups=2)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, generator=torch.Generator().manual_seed(0))
    _, idx, _ = gate(torch.randn(512, cfg.dim, generator=torch.Generator().manual_seed(1)))
    ranks_per_token = dispatch_layout(idx, cfg.n_routed_experts, ep).token_in_rank.sum(1)
    assert ranks_per_token.max() <= cfg.n_limited_groups
    assert ranks_per_token.max() == cfg.n_limited_groups  # the bound is reached: the test can see a breach
