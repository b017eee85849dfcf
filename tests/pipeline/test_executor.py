"""The executor trains like the non-pipelined model: real multi-process runs over gloo.

Tolerances. Each rank computes a micro-batch's forward and backward with the same kernels and
shapes as the single-process reference, so losses agree to the last bit in practice; we require
1e-6 relative (the task's bound; a later step may differ by rounding carried in parameters).
Parameter gradients are sums over micro-batches; a schedule may add them in another order
(DualPipe: two copies summed at the end; split W's finish out of order), and reordering a sum of
m fp32 terms changes it by at most about 2*m*u*sum_i|g_i| (u = 2^-24): that is the bound,
element by element, with sum_i|g_i| taken from the reference run.
"""
import pytest
import torch
from torch import nn

from dsv3.parallel.pipeline import SCHEDULES, Op, build_schedule
from dsv3.parallel.pipeline.executor import PipelineExecutor, Stage
from tests.parallel.distributed_testing import run_ranks
from tests.pipeline.pipeline_testing import (deadlock_worker, pipeline_cases_worker, reference_step, toy_batches,
                                             toy_loss, toy_model)

U = 2.0 ** -24


def cases(pp):
    out = [dict(schedule=s, microbatches=2 * pp, steps=2, aux_weight=0.01) for s in SCHEDULES]
    # other micro-batch counts, deeper stages, and an F&B hook that runs the backward first
    out.append(dict(schedule="dualpipe", microbatches=2 * pp + 2, steps=1, overlap="reversed"))
    out.append(dict(schedule="dualpipev", microbatches=2 * pp + 1, steps=1, overlap="reversed",
                    layers_per_stage=2))
    out.append(dict(schedule="zb1p", microbatches=pp + 1, steps=1, layers_per_stage=2))
    return out


_RUNS: dict[int, list] = {}


def runs(pp):
    """One launch of pp ranks runs every case (starting processes is the expensive part)."""
    if pp not in _RUNS:
        _RUNS[pp] = run_ranks(pipeline_cases_worker, pp, cases(pp), timeout=150)
    return _RUNS[pp]


PARAMS = [(pp, i) for pp in (2, 4) for i in range(len(cases(pp)))]


@pytest.mark.parametrize("pp,i", PARAMS,
                         ids=[f"pp{pp}-{cases(pp)[i]['schedule']}-case{i}" for pp, i in PARAMS])
def test_pipelined_training_matches_single_process(pp, i):
    case = cases(pp)[i]
    per_rank = [r[i] for r in runs(pp)]
    ref = per_rank[0]
    m = case["microbatches"]
    for step in range(case["steps"]):
        losses = {}
        for r in per_rank:
            for mb, v in r["losses"][step].items():
                assert mb not in losses, f"micro-batch {mb} loss reported twice"
                losses[mb] = v
        assert sorted(losses) == list(range(m))
        got = torch.stack([losses[mb] for mb in range(m)])
        torch.testing.assert_close(got, ref["ref_losses"][step], rtol=1e-6, atol=0)
        for r in per_rank:      # every rank gets the batch mean for logging
            torch.testing.assert_close(r["mean_loss"][step], ref["ref_losses"][step].mean(),
                                       rtol=1e-6, atol=0)

    # step 0's gradients: same parameters on both sides, so only the summation order may differ
    seen = set()
    for r in per_rank:
        for name, g in r["grads"][0].items():
            bound = 2 * m * U * ref["ref_abs"][0][name]
            err = (g - ref["ref_grads"][0][name]).abs()
            assert (err <= bound).all(), f"{name}: max error {err.max():.3g}, bound {bound.max():.3g}"
            seen.add(name)
    assert seen == set(ref["ref_grads"][0]), "some parameters were not held by any rank"


@pytest.mark.parametrize("pp", [2, 4])
def test_dualpipe_copies_of_a_stage_agree_after_reduction(pp):
    i = next(k for k, c in enumerate(cases(pp)) if c["schedule"] == "dualpipe")
    per_rank = [r[i] for r in runs(pp)]
    for step in range(cases(pp)[i]["steps"]):
        for r in range(pp):
            for name, g in per_rank[r]["grads"][step].items():
                assert torch.equal(g, per_rank[pp - 1 - r]["grads"][step][name]), name


@pytest.mark.parametrize("pp", [2, 4])
def test_overlap_hook_runs_every_fb_pair(pp):
    for i, case in enumerate(cases(pp)):
        sched = build_schedule(case["schedule"], pp, case["microbatches"])
        for r, res in enumerate(runs(pp)):
            pairs = sum(ins.op is Op.FB for ins in sched.compute(r))
            assert res[i]["overlap_calls"] == pairs * case["steps"]
            if case["schedule"] in ("dualpipe", "dualpipev"):
                assert pairs > 0


def test_deadlock_fails_within_the_deadline():
    with pytest.raises(TimeoutError, match="did not finish within 5 s"):
        run_ranks(deadlock_worker, 2, timeout=5)


# ---- single rank (pp=1): no process group needed; DualPipeV passes its V turn locally ----

@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipev"])
def test_single_rank_executor_matches_reference(schedule):
    sched = build_schedule(schedule, 1, 4)
    model = toy_model(sched.n_stages, aux_weight=0.01)
    stages = [Stage(s, model[s], toy_loss if s == sched.n_stages - 1 else None)
              for s in range(sched.n_stages)]
    (inputs, targets), = toy_batches(1, 4)
    res = PipelineExecutor(sched, stages, act_shape=(2, 4, 16), rank=0).step(inputs, targets)
    grads = {n: p.grad.clone() for n, p in nn.ModuleList(model).named_parameters()}
    ref_model = toy_model(sched.n_stages, aux_weight=0.01)
    ref_losses, _ = reference_step(ref_model, inputs, targets)
    assert torch.equal(torch.stack([res.losses[m] for m in range(4)]), torch.stack(ref_losses))
    for n, p in nn.ModuleList(ref_model).named_parameters():
        assert torch.equal(grads[n], p.grad), n
    assert set(res.aux_losses) == {0, 1, 2, 3}
    assert len(res.timeline) == len(sched.compute(0)) and res.busy <= res.wall


def test_executor_rejects_bad_stages():
    sched = build_schedule("dualpipev", 2, 4)
    model = toy_model(4)
    with pytest.raises(ValueError, match=r"rank 0 of schedule 'dualpipev' must hold stages \[0, 3\], got \[0, 1\]"):
        PipelineExecutor(sched, [Stage(0, model[0]), Stage(1, model[1])], act_shape=(2, 4, 16), rank=0)
    with pytest.raises(ValueError, match="loss_fn is required on the last stage"):
        PipelineExecutor(sched, [Stage(0, model[0]), Stage(3, model[3])], act_shape=(2, 4, 16), rank=0)


def test_executor_reports_wrong_activation_shape_and_missing_data():
    sched = build_schedule("zb1p", 1, 2)
    model = toy_model(1)
    ex = PipelineExecutor(sched, [Stage(0, model[0], toy_loss)], act_shape=(2, 4, 16), rank=0)
    with pytest.raises(ValueError, match=r"needs inputs\[0\]; got None inputs"):
        ex.step(None, None)
    sched = build_schedule("dualpipev", 1, 2)
    model = toy_model(2)
    ex = PipelineExecutor(sched, [Stage(0, model[0]), Stage(1, model[1], toy_loss)],
                          act_shape=(2, 4, 8), rank=0)
    (inputs, targets), = toy_batches(1, 2)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 16\) .* act_shape=\(2, 4, 8\)"):
        ex.step(inputs, targets)


def test_overlap_hook_must_run_both_halves():
    sched = build_schedule("dualpipev", 1, 2)
    model = toy_model(2)
    ex = PipelineExecutor(sched, [Stage(0, model[0]), Stage(1, model[1], toy_loss)],
                          act_shape=(2, 4, 16), rank=0, overlap=lambda fwd, bwd: fwd.run())
    (inputs, targets), = toy_batches(1, 2)
    with pytest.raises(RuntimeError, match="overlap hook must run both tasks"):
        ex.step(inputs, targets)


class HeadLoss(nn.Module):
    """Output head inside loss_fn, as V3's head + MTP would be (they need the target tokens)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, target):
        return toy_loss(self.head(hidden), target)


def test_loss_fn_parameters_get_gradients_with_split_backward():
    from dsv3.parallel.pipeline import Instr, Schedule, validate_schedule
    # one rank, two local stages, every backward split into I and W
    order = [Instr(Op.F, 0, 0), Instr(Op.F, 1, 0), Instr(Op.I, 1, 0), Instr(Op.I, 0, 0),
             Instr(Op.F, 0, 1), Instr(Op.F, 1, 1), Instr(Op.I, 1, 1), Instr(Op.W, 1, 0),
             Instr(Op.I, 0, 1), Instr(Op.W, 0, 0), Instr(Op.W, 1, 1), Instr(Op.W, 0, 1)]
    sched = Schedule("handmade", 1, 2, 2, ((0, 0),), (0, 0), [order])
    validate_schedule(sched)
    model = toy_model(2)
    head, model[1].head = model[1].head, None
    loss = HeadLoss(head)
    ex = PipelineExecutor(sched, [Stage(0, model[0]), Stage(1, model[1], loss)],
                          act_shape=(2, 4, 16), rank=0)
    (inputs, targets), = toy_batches(1, 2)
    ex.step(inputs, targets)
    ref = toy_model(2)
    reference_step(ref, inputs, targets)
    got = dict(nn.ModuleList([model[0], model[1], loss]).named_parameters())
    for name, p in nn.ModuleList(ref).named_parameters():
        mine = got[name.replace("1.head.", "2.head.")]
        assert torch.equal(mine.grad, p.grad), name
