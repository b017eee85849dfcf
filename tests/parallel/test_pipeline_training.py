"""Pipeline parallelism through the real entry point (torchrun, gloo, fp32): every schedule trains
moe_tiny (MTP on, MoE layers on several stages) like one process, and checkpoints reshard between
pp=2 and pp=1 in both directions (which is also how resuming under pp=2 is tested: a SIGKILL test
like tests/train/test_resume.py's would cost two more launches; what it adds, atomic saves, does
not depend on the plan).

Tolerance against the single process: 1e-6 relative on the losses (main, MTP, balance), the global
gradient norm, MaxVio and the held-out loss. Each micro-batch is computed with the same kernels and
shapes as in the single process; what differs is the order of some sums (DualPipe's two copies of a
stage, the embedding's gradient from the first and the last stage, per-stage partial balance losses):
~1e-7, and over 3 AdamW steps the losses come out equal or within 3e-7. A wrong gradient scale (a
copy not summed, a missing 1/m) shows in grad_norm at once; a wrong router count in max_vio; a wrong
stage cut or dropped micro-batch in the losses at 1e-3.

Shared setup, to keep the file at ~2 minutes on 2 cores (tests/parallel/conftest.py): the embedded
corpus' cached shards are passed as `data=shards` (its discovery walks the standard library, ~4 s per
process), and one single-process run is the reference of every case.
"""
import os

import pytest

from dsv3.train.checkpoint import step_dir
from tests.helpers import (assert_same_expert_loads, assert_same_losses, checked, read_metrics, run_pretrain,
                           run_torchrun)
from tests.parallel.plan_testing import PLAN_KEYS, plan_args

STEPS = 3
KEYS = PLAN_KEYS
RTOL = 1e-6

CASES = {  # name: (processes, overrides)
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2-zb1p": (2, ["parallel.pp=2", "parallel.pp_schedule=zb1p"]),
    "pp2-dualpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe"]),
    "pp2-dualpipev-dp2": (4, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]),  # 4 stages, m = 4 per dp rank
    "pp4-1f1b": (4, ["parallel.pp=4", "parallel.pp_schedule=1f1b"]),
    "pp4-dualpipe": (4, ["parallel.pp=4", "parallel.pp_schedule=dualpipe"]),
}


@pytest.fixture(scope="module")
def args() -> list[str]:
    return plan_args(STEPS)


@pytest.fixture(scope="module")
def single(plan_runs) -> str:
    return plan_runs(STEPS, 1)[0]


@pytest.fixture(scope="module")
def pipelined(plan_runs):
    """Runs a case once (the reshard and resume tests reuse their checkpoints)."""
    def run(name: str) -> str:
        nproc, overrides = CASES[name]
        return plan_runs(STEPS, nproc, *overrides)[0]

    return run


def assert_close(reference: list[dict], other: list[dict]) -> None:
    assert len(reference) == len(other) > 0
    assert_same_losses(reference, other, rtol=RTOL, keys=KEYS)
    if "val_loss" in reference[-1]:
        assert abs(other[-1]["val_loss"] - reference[-1]["val_loss"]) <= RTOL * reference[-1]["val_loss"]
        # held-out MaxVio: every stage's routers counted, summed over the copies, gathered to all layers
        assert abs(other[-1]["val_max_vio"] - reference[-1]["val_max_vio"]) <= RTOL * reference[-1]["val_max_vio"]


@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_run_trains_like_one_process(case, single, pipelined):
    reference = read_metrics(single)
    assert [m["step"] for m in reference] == list(range(1, STEPS + 1))
    assert "val_loss" in reference[-1]
    assert_close(reference, read_metrics(pipelined(case)))
    assert_same_expert_loads(single, pipelined(case), atol=1e-6)  # every stage's layers, in model order


def test_pp2_checkpoint_resumes_at_pp1_and_pp1_checkpoint_at_pp2(single, pipelined, args, tmp_path):
    """DCP by global names: a checkpoint written by pipeline stages (one copy of the replicated
    embedding, each stage's weights, AdamW moments and router biases) loads into the whole model,
    and the whole model's into the stages of DualPipe (two copies of each); each run continues like
    the run that wrote the checkpoint. Step 3's loss checks the restored weights; the held-out loss
    after step 3's update checks the moments (zeroed moments move it by 1.3e-3)."""
    source = pipelined("pp2-1f1b")
    to_pp1, to_pp2 = str(tmp_path / "pp2_to_pp1"), str(tmp_path / "pp1_to_pp2")
    r1 = checked(run_pretrain(to_pp1, *args, f"train.resume={step_dir(os.path.join(source, 'checkpoints'), 2)}",
                              timeout=300))
    r2 = checked(run_torchrun(2, to_pp2, *args, *CASES["pp2-dualpipe"][1],
                              f"train.resume={step_dir(os.path.join(single, 'checkpoints'), 2)}", timeout=300))
    for writer, resumed, r in ((source, to_pp1, r1), (single, to_pp2, r2)):
        assert "resumed from" in r.stdout and "at step 2" in r.stdout
        continued = read_metrics(resumed)
        assert [m["step"] for m in continued] == [3]
        assert_close(read_metrics(writer)[2:], continued)
