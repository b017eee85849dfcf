"""The F&B overlap of the expert all-to-alls (dsv3/parallel/overlap.py), on 2 gloo ranks of an EP group:
the forward of one micro-batch and the backward of another run as a pair through the plan's
Communicator, as DualPipe's F&B pairs do in the executor.

- It overlaps: every all-to-all issued while the other half still has work is followed by a piece of
  the other half's computation (it gets the baton and runs up to its own next all-to-all) before it is
  waited on. Without the overlap, every all-to-all is waited on right after it is issued (or after the
  ones issued with it, as dispatch's rows and their routing).
- It changes no number: losses and every gradient are bit-identical with the overlap on and off
  (exactly one half computes at any time, each op on the same inputs).
- Without a pipeline, the accumulation runs as such pairs (forward of j+1 with backward of j) and
  gives the plain loop's losses and gradients bit for bit.
"""
import dataclasses
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from dsv3.config.schema import Config, ModelConfig
from dsv3.parallel.mesh import Env
from dsv3.model.step_aux import StepAux
from dsv3.parallel.plan import build_plan
from dsv3.train.trainer import build_model
from tests.parallel.distributed_testing import run_workers

MODEL = ModelConfig(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=2,
                    n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                    route_scale=2.5, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, max_seq_len=32, mtp_depth=1, init_std=0.1)


def pair_on_one_rank(rank: int, world: int, overlap: bool):
    """Forward of micro-batch a and backward of micro-batch b as one pair; returns (F's losses, the
    gradients, the trace of all-to-all events)."""
    cfg = Config(model=MODEL)
    cfg.parallel = dataclasses.replace(cfg.parallel, ep=world)
    cfg.train.seed = 5
    model = build_model(cfg, torch.device("cpu"))
    plan = build_plan(model, cfg, Env(rank, world, rank, torch.device("cpu")))
    plan.comm.overlap = overlap
    model.train()
    g = torch.Generator().manual_seed(100 + rank)
    a, b = (torch.randint(0, MODEL.vocab_size, (2, 17), generator=g) for _ in range(2))
    parts_b = model.losses(b[:, :-1], b[:, 1:])          # b's forward, before the pair
    loss_b = parts_b.main + 0.3 * torch.stack(parts_b.mtp).mean()
    out = {}

    def forward_a():
        parts = model.losses(a[:, :-1], a[:, 1:])
        out["a"] = torch.stack([parts.main, *parts.mtp]).detach()

    plan.comm.trace = []
    plan.comm.run_pair(SimpleNamespace(run=forward_a), SimpleNamespace(run=loss_b.backward))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["a"], grads, plan.comm.trace


def check_trace(trace: list, overlapped: bool) -> int:
    """Returns how many all-to-alls had the other half's computation between their issue and wait."""
    events = [(kind, task) for kind, task, _ in trace]
    ended = set()
    hidden = 0
    for i, (kind, task) in enumerate(events):
        if kind == "end":
            ended.add(task)
        if kind != "issue":
            continue
        j = events.index(("wait", task), i)
        between = events[i + 1:j]
        other = "B" if task == "F" else "F"
        if overlapped and other not in ended:
            assert ("run", other) in between, f"{task}'s all-to-all #{i} was waited on before {other} computed"
            hidden += 1
        if not overlapped:  # at most further all-to-alls of the same task issued before the wait
            assert all(e == ("issue", task) for e in between), f"{task} did not wait at once: {between}"
    return hidden


def overlap_worker(rank: int, world: int) -> None:
    losses_on, grads_on, trace_on = pair_on_one_rank(rank, world, overlap=True)
    losses_off, grads_off, trace_off = pair_on_one_rank(rank, world, overlap=False)

    assert torch.equal(losses_on, losses_off), (losses_on, losses_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 10
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), f"rank {rank}: {name} differs with the overlap on"

    hidden = check_trace(trace_on, overlapped=True)
    tasks = {task for kind, task, _ in trace_on if kind == "issue"}
    assert tasks == {"F", "B"}, tasks
    # forward: 3 exchanges per dispatch, 1 per combine, for each of 3 MoE layers (2 main + MTP);
    # backward: one per dispatch and per combine. Most of them are hidden behind the other half.
    assert hidden >= 8, (hidden, [(k, t) for k, t, _ in trace_on])
    check_trace(trace_off, overlapped=False)




def accumulation_worker(rank: int, world: int) -> None:
    results = []
    for overlap in (True, False):
        cfg = Config(model=MODEL)
        cfg.parallel = dataclasses.replace(cfg.parallel, ep=world, overlap=overlap)
        cfg.train.seed = 5
        model = build_model(cfg, torch.device("cpu"))
        plan = build_plan(model, cfg, Env(rank, world, rank, torch.device("cpu")))
        g = torch.Generator().manual_seed(200 + rank)
        batches = [torch.randint(0, MODEL.vocab_size, (2, 13), generator=g) for _ in range(3)]
        plan.comm.trace = []
        parts, counts = plan.train_step(lambda j: (batches[j][:, :-1], batches[j][:, 1:], None), 3, 0.3,
                                        StepAux(balance_coeff=0.01), nullcontext())
        pairs = sum(1 for kind, task, _ in plan.comm.trace if kind == "end") // 2
        assert pairs == (2 if overlap else 0), pairs
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        loads = torch.stack([counts[m] for m in model.moe_layers()])
        results.append((parts, grads, loads))
    (p_on, g_on, l_on), (p_off, g_off, l_off) = results
    assert torch.equal(p_on, p_off) and torch.equal(l_on, l_off)
    assert g_on.keys() == g_off.keys()
    assert all(torch.equal(g_on[n], g_off[n]) for n in g_on), [n for n in g_on if not torch.equal(g_on[n], g_off[n])]


def both_workers(rank: int, world: int) -> None:
    overlap_worker(rank, world)
    accumulation_worker(rank, world)


def test_pairs_overlap_their_all_to_alls_and_change_no_bit():
    """One launch of 2 processes for both properties (start-up is most of the cost)."""
    run_workers(both_workers, 2, timeout=180)
