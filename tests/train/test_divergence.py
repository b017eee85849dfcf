"""A diverging run (optim.lr=1e4 without clipping: NaN gradients from step 2) is caught on every rank,
its steps are not applied, it stops with exit code 3, and no non-finite model is ever saved."""
import os
import re

import pytest
import torch

from dsv3.train.checkpoint import checkpoints
from dsv3.train.nonfinite import NonFiniteSteps, agree_on_step, model_is_finite
from tests.helpers import read_metrics, run_pretrain, run_torchrun
from tests.parallel.distributed_testing import run_workers

DIVERGE = ["+experiment=moe_tiny", "train.max_steps=10", "optim.lr=1e4", "optim.grad_clip=0", "checkpoint.every=1",
           "checkpoint.keep=0"]


@pytest.mark.parametrize("policy,skipped", [("stop", 1)])  # skip (the default): the torchrun test below
def test_a_diverging_run_stops_with_exit_3_and_saves_only_finite_models(policy, skipped, tmp_path):
    run = str(tmp_path / "run")
    r = run_pretrain(run, *DIVERGE, f"train.on_nonfinite={policy}", "train.max_consecutive_skips=3")
    assert r.returncode == 3, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    m = read_metrics(run)
    bad = [x["step"] for x in m if x["skipped"]]
    assert len(bad) == skipped and bad == list(range(bad[0], bad[0] + skipped)) and m[-1]["step"] == bad[-1]
    assert all(x["grad_norm"] is None or x["loss"] is None for x in m if x["skipped"])  # NaN is written as null
    assert f"stopping at step {bad[-1]}: {skipped} non-finite step(s) in a row; nothing saved" in r.stdout
    assert f"step {bad[0]}: non-finite loss" in r.stdout
    # Saved: the steps before the divergence, not the skipped ones (the same weights would prune good ones).
    saved = sorted(int(os.path.basename(p)[5:]) for p in checkpoints(os.path.join(run, "checkpoints")))
    assert saved == list(range(1, bad[0]))


def test_torchrun_ranks_agree_on_skipping_and_stop_together(tmp_path):
    run = str(tmp_path / "run")
    r = run_torchrun(2, run, *DIVERGE, timeout=300)
    assert r.returncode != 0
    # torchrun reports each worker's exit code; both stopped for divergence, none was killed waiting for the other
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
    assert codes and set(codes) <= {"3", "-15"} and "3" in codes, r.stderr[-3000:]
    m = read_metrics(run)
    assert [x["step"] for x in m if x["skipped"]] == [2, 3, 4]
    assert len(checkpoints(os.path.join(run, "checkpoints"))) == 1


def agreement_worker(rank: int, world: int) -> None:
    """Only rank 1 sees a NaN loss, only rank 0 an infinite gradient norm, only rank 1 a NaN weight:
    every rank reaches the same verdicts."""
    finite_sums, nan_sums = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([float("nan"), 2.0, 3.0])
    sums, ok = agree_on_step(finite_sums, torch.tensor(1.0))
    assert ok and torch.equal(sums, world * finite_sums)
    assert not agree_on_step(nan_sums if rank == 1 else finite_sums, torch.tensor(1.0))[1]
    assert not agree_on_step(finite_sums, torch.tensor(float("inf") if rank == 0 else 1.0))[1]
    model = torch.nn.Linear(3, 3)
    assert model_is_finite(model, torch.device("cpu"))
    if rank == 1:
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    assert not model_is_finite(model, torch.device("cpu"))


def test_ranks_agree_when_only_one_of_them_sees_a_non_finite_value():
    run_workers(agreement_worker, 2)


def test_skips_count_in_a_row_and_reset_on_a_finite_step():
    steps = NonFiniteSteps("skip", 2)
    for finite, stop in [(False, False), (True, False), (False, False), (False, True)]:
        steps.record(finite)
        assert steps.must_stop == stop
    assert steps.total == 3
    once = NonFiniteSteps("stop", 5)
    once.record(False)
    assert once.must_stop
