"""The direct (intranode, shared-memory) EP transport against the all-to-all, with real processes.

- Bit-identical: the routed MoE's output and every gradient (tokens, router, both expert weights) are
  the same bits whichever transport runs, at ep=2 and ep=4, in fp32 and bf16 and with FP8 dispatch,
  with padding, empty ranks and two micro-batches in flight (the F&B overlap's pattern). Both
  transports run the same kernels and deliver rows in the same order, so nothing may differ at all.
- Races: skewed routing (one rank receives almost everything, others nothing, a rank without tokens),
  repeated with changing sizes (the receive slots grow mid-run), each iteration bit-compared.
- Failure: a rank that dies mid-exchange makes its peers raise an error naming it within a second or
  so (not the timeout), and a live rank that stops exchanging makes them raise after the timeout.
"""
import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dsv3.model.init import init_weights
from dsv3.model.moe import Experts
from dsv3.parallel.ep_transport import AllToAllTransport, DirectTransport, Gather
from dsv3.parallel.expert_parallel import ExpertParallelDispatcher
from tests.parallel.distributed_testing import free_port, run_ranks

INTER = 8


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equality of bits (torch.equal calls -0.0 and 0.0 equal, and NaN unequal)."""
    return t.detach().contiguous().view(torch.uint8)


def make_experts(n_experts: int, world: int, rank: int, dim: int, dtype: torch.dtype) -> Experts:
    local = Experts(n_experts // world, dim, INTER)
    local.expert_offset = rank * (n_experts // world)
    init_weights(local, seed=7, std=dim ** -0.5)
    return local.to(dtype)


def micro_batch(rank: int, n: int, dim: int, k: int, n_experts: int, seed: int, dtype: torch.dtype,
                hot: list[int] | None = None):
    """Tokens, routing (from `hot` experts with probability 0.9 if given), output gradient."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(n, dim, generator=g).to(dtype)
    idx = torch.rand(n, n_experts, generator=g).topk(k, dim=1).indices
    if hot is not None:
        h = torch.tensor(hot)
        pick = h[torch.rand(n, len(hot), generator=g).topk(k, dim=1).indices]
        idx = torch.where((torch.rand(n, 1, generator=g) < 0.9), pick, idx)
    return x, idx, torch.randn(n, dim, generator=g)


def moe_steps(d: ExpertParallelDispatcher, experts: Experts, router: torch.Tensor, batches) -> list[torch.Tensor]:
    """The routed MoE on every micro-batch, all dispatches issued before any is waited for (and likewise
    the combines), then one backward: outputs and gradients."""
    experts.zero_grad()
    r = router.clone().requires_grad_()
    xs = [x.clone().requires_grad_() for x, _, _ in batches]
    weights = []
    for x, (_, idx, _) in zip(xs, batches):
        w = torch.sigmoid(x.float() @ r.T).gather(1, idx)
        weights.append(w / w.sum(-1, keepdim=True))
    sent = [d.dispatch_issue(x, idx) for x, (_, idx, _) in zip(xs, batches)]
    got = [d.dispatch_wait(p) for p in sent]
    ys = [experts(rows, offsets) for rows, offsets, _ in got]
    back = [d.combine_issue(y, w, state) for y, w, (_, _, state) in zip(ys, weights, got)]
    outs = [d.combine_wait(p) for p in back]
    sum((out.float() * g).sum() for out, (_, _, g) in zip(outs, batches)).backward()
    return outs + [x.grad for x in xs] + [r.grad, experts.w13.grad, experts.w2.grad]


def assert_same_bits(direct: list[torch.Tensor], a2a: list[torch.Tensor], what: str) -> None:
    assert len(direct) == len(a2a)
    for i, (a, b) in enumerate(zip(direct, a2a)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: tensor {i}: {a.dtype}{list(a.shape)} vs " \
                                                          f"{b.dtype}{list(b.shape)}"
        assert torch.equal(bits(a), bits(b)), f"{what}: tensor {i} differs between direct and all_to_all"


def parity_worker(rank: int, world: int, cases: list[dict]) -> int:
    group = dist.group.WORLD
    direct = DirectTransport(group, torch.device("cpu"), timeout_s=60)
    a2a = AllToAllTransport(group)
    compared = 0
    for case in cases:
        dtype, dim, n_experts, k = case["dtype"], case["dim"], case["experts"], case["k"]
        router = torch.randn(n_experts, dim, generator=torch.Generator().manual_seed(5)) * dim ** -0.5
        for it in range(case.get("iterations", 1)):
            tokens = case["tokens"](it) if callable(case["tokens"]) else case["tokens"]
            hot = case["hot"](it) if "hot" in case else None
            batches = [micro_batch(rank, tokens[rank], dim, k, n_experts, seed=10 * it + mb, dtype=dtype, hot=hot)
                       for mb in range(case["micro_batches"])]
            results = {}
            for transport in (direct, a2a):
                d = ExpertParallelDispatcher(group, n_experts, align=case["align"], fp8=case["fp8"],
                                             transport=transport)
                experts = make_experts(n_experts, world, rank, dim, dtype)
                results[transport.kind] = moe_steps(d, experts, router, batches)
            where = f"rank {rank}, {case['name']}, iteration {it}"
            assert_same_bits(results["direct"], results["all_to_all"], where)
            compared += 1
    # Exchanges in flight are bounded by the receive slots, and going past them is a clear local error.
    rows = torch.ones(world, 4)
    splits = direct.exchange_counts(torch.ones(world, 1, dtype=torch.int64))[0]
    spec = [Gather(rows, torch.arange(world))]
    pending = [direct.issue(spec, splits) for _ in range(direct.n_slots)]
    with pytest.raises(RuntimeError, match="at most 2 exchanges may be in flight"):
        direct.issue(spec, splits)
    for p in pending:
        assert torch.equal(direct.wait(p)[0], torch.ones(world, 4))
        direct.release(p)
    direct.close()
    return compared


def base_cases(world: int) -> list[dict]:
    """fp32 with padding and a rank without tokens (rank 1), bf16, FP8 dispatch (two full 1x128 tiles and a
    narrow one); two micro-batches in flight each time."""
    tokens = [11, 0, 7, 5][:world] if world == 4 else [9, 4]
    return [
        dict(name="fp32", dtype=torch.float32, dim=24, experts=8, k=3, tokens=tokens, align=4, fp8=False,
             micro_batches=2),
        dict(name="bf16", dtype=torch.bfloat16, dim=40, experts=8, k=2, tokens=tokens, align=1, fp8=False,
             micro_batches=2),
        dict(name="fp8 dispatch", dtype=torch.float32, dim=300, experts=8, k=2, tokens=tokens, align=1, fp8=True,
             micro_batches=2),
    ]


def test_direct_equals_all_to_all_bit_for_bit_at_ep2():
    assert run_ranks(parity_worker, 2, base_cases(2), timeout=240) == [3, 3]


def _skewed_tokens(it: int) -> list[int]:
    """Changing sizes (the slots grow now and then); rank (it + 1) % 4 has no tokens."""
    n = [(7 * it + 13 * r) % 50 + 1 for r in range(4)]
    n[(it + 1) % 4] = 0
    return n


def _hot_rank_experts(it: int) -> list[int]:
    """Both experts of rank it % 4 (8 experts over 4 ranks)."""
    return [2 * (it % 4), 2 * (it % 4) + 1]


def test_direct_equals_all_to_all_at_ep4_and_under_skewed_routing_repeated():
    """ep=4: the base cases, then 24 iterations in which ~90% of the routing goes to one rank's experts
    (a different rank each time), the others receive almost nothing, one rank has no tokens at all."""
    iterations = 24
    stress = dict(name="skewed", dtype=torch.float32, dim=136, experts=8, k=2, tokens=_skewed_tokens,
                  hot=_hot_rank_experts, align=1, fp8=False, micro_batches=2,
                  iterations=iterations)
    stress_fp8 = dict(stress, name="skewed fp8", fp8=True, iterations=6)
    got = run_ranks(parity_worker, 4, base_cases(4) + [stress, stress_fp8], timeout=400)
    assert got == [3 + iterations + 6] * 4


# -- failures ---------------------------------------------------------------------------------------------

def failure_worker(rank: int, world: int, port: int, results) -> None:
    """Phase 1: rank 1 stays alive but stops exchanging; the others time out (1 s). Phase 2: rank 1 dies
    after the counts of an exchange, before its rows; the others notice that it exited."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    group = dist.group.WORLD
    try:
        report = {}
        stalled = DirectTransport(group, torch.device("cpu"), timeout_s=1.0)
        d = ExpertParallelDispatcher(group, 6, transport=stalled)
        x, idx = torch.randn(5, 16), torch.tensor([[0, 2], [3, 5], [1, 4], [0, 5], [2, 3]])
        rows, _, state = d.dispatch(x, idx)
        d.combine(rows, torch.ones(5, 2), state)  # works while all take part
        if rank == 1:
            time.sleep(3.0)
        else:
            t0 = time.monotonic()
            try:
                d.dispatch(x, idx)
                report["stall"] = "no error"
            except RuntimeError as e:
                report["stall"] = (str(e), time.monotonic() - t0)
        stalled.close()

        dying = DirectTransport(group, torch.device("cpu"), timeout_s=60.0)
        d = ExpertParallelDispatcher(group, 6, transport=dying)
        d.dispatch(x, idx)
        if rank == 1:
            d.transport.exchange_counts(torch.ones(world, 2, dtype=torch.int64))  # the next exchange's counts ...
            os._exit(17)                                                           # ... and then nothing
        t0 = time.monotonic()
        try:
            d.dispatch(x, idx)
            report["death"] = "no error"
        except RuntimeError as e:
            report["death"] = (str(e), time.monotonic() - t0)
        results.put((rank, report))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)  # no teardown: the group has a dead member


def test_a_stalled_rank_times_out_and_a_dead_rank_is_named_at_once():
    world = 3
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=failure_worker, args=(r, world, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + 180
    try:
        while len(reports) < world - 1 and time.monotonic() < deadline:
            try:
                rank, report = results.get(timeout=1)
            except queue.Empty:
                continue
            assert isinstance(report, dict), f"rank {rank} failed:\n{report}"
            reports[rank] = report
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    assert sorted(reports) == [0, 2], f"the surviving ranks did not report (hang?): {reports}"
    assert procs[1].exitcode == 17
    for rank, report in reports.items():
        message, waited = report["stall"]
        assert "rank 1 of the EP group" in message and "did not reach round" in message, message
        assert 0.9 < waited < 10, waited
        message, waited = report["death"]
        assert f"rank 1 of the EP group (pid {procs[1].pid}) exited" in message, message
        assert waited < 10, waited  # the liveness check, long before the 60 s timeout


def test_gpu_benchmark_of_the_transport_kernels_runs_dry_on_the_cpu():
    """benchmarks/gpu/ep_transport.py (for the GPU check) runs its tiny CPU variant: every op times."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu", "ep_transport.py")
    spec = importlib.util.spec_from_file_location("gpu_ep_transport", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.run(dry_run=True)
    assert report["mode"] == "dry-run"
    ops = {r["op"] for r in report["rows"]}
    assert {"copy_ (memory bandwidth)", "dispatch put fp8 + scales", "combine put bf16"} <= ops
    assert all(r["ms"] > 0 and r["gb_per_s"] > 0 for r in report["rows"])
