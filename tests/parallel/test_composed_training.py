"""Expert parallelism inside pipeline stages, through the real entry point (torchrun, gloo, 4 ranks):
pp=2 x dp=2 with the dp ranks of each stage forming an EP group of 2, for every schedule.

- Each schedule trains like one process (fp32, 1e-5 relative: losses, the global gradient norm,
  MaxVio, the held-out loss). What differs from the single process is the order of some sums (the
  token exchange's backward, the EDP and replica reductions, DualPipe's two copies): ~1e-7 per step.
  A wrong expert slice, gradient scale or router count shows at 1e-3 (grad_norm at once).
- parallel.overlap=false gives bit for bit the losses of the overlapped run, and a run killed after a
  checkpoint resumes bit for bit (one launch pair does both: the steps before the kill check the
  first, the steps after the resume the second).
- A checkpoint written under pp=2 x ep=2 resumes under ep=2 alone and under one process with the
  losses of the run that never changed plan (1e-5).
- precision=fp8 under pp=2 x ep=2 stays in the FP8 band (2e-3, tests/fp8/test_expert_parallel_fp8.py
  says why) of the fp8 single process.

Shared setup (about 3 minutes on 2 cores; tests/parallel/conftest.py): the cached shards of the embedded
corpus, one single-process reference per precision (shared with the ZeRO tests), one run per case reused
by the resume tests.
"""
import os
import re
import subprocess
import time

import pytest

from dsv3.train.checkpoint import latest_checkpoint, step_dir
from tests.helpers import (ROOT, assert_same_losses, checked, kill_hard, read_metrics, run_pretrain,
                           run_torchrun, torchrun_cmd)
from tests.parallel.plan_testing import PLAN_KEYS, plan_args

STEPS = 4
KEYS = PLAN_KEYS
RTOL = 1e-5
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def composed(schedule: str) -> list[str]:
    return ["parallel.pp=2", "parallel.ep=2", f"parallel.pp_schedule={schedule}"]


@pytest.fixture(scope="module")
def args() -> list[str]:
    return plan_args(STEPS)


@pytest.fixture(scope="module")
def runs(plan_runs):
    """run(name, nproc, *overrides) -> its run directory (the session's run of those overrides)."""
    def run(name: str, nproc: int, *overrides: str) -> str:
        run_dir, out = plan_runs(STEPS, nproc, *overrides)
        if "parallel.ep=2" in overrides and "parallel.pp=2" in overrides:
            assert "pp=2" in out and "x ep=2" in out, out[-2000:]
        return run_dir

    return run


def assert_close(reference: list[dict], other: list[dict], rtol: float = RTOL, keys=KEYS) -> None:
    assert len(reference) == len(other) > 0
    assert_same_losses(reference, other, rtol=rtol, keys=keys)
    if "val_loss" in reference[-1]:
        assert abs(other[-1]["val_loss"] - reference[-1]["val_loss"]) <= rtol * reference[-1]["val_loss"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_experts_inside_pipeline_stages_train_like_one_process(schedule, runs):
    reference = read_metrics(runs("single", 1))
    assert [m["step"] for m in reference] == list(range(1, STEPS + 1)) and "val_loss" in reference[-1]
    metrics = read_metrics(runs(schedule, 4, *composed(schedule)))
    assert_close(reference, metrics)
    assert all(m["a2a_s"] > 0 for m in metrics)   # the experts did exchange tokens


@pytest.fixture(scope="module")
def killed_without_overlap(tmp_path_factory, args):
    """DualPipe with parallel.overlap=false, SIGKILLed after its step-2 checkpoint and resumed:
    (the metrics logged before the kill, those logged after the resume, the step it resumed at)."""
    run_dir = str(tmp_path_factory.mktemp("dualpipe_overlap_off_killed"))
    overrides = [*args, *composed("dualpipe"), "parallel.overlap=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun_cmd(4, run_dir, *overrides, "train.resume=none"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not latest_checkpoint(f"{run_dir}/checkpoints"):
            time.sleep(0.02)
    finally:
        killed = kill_hard(proc)
    assert len(killed) >= 4, f"the workers had already exited: {killed}"
    before = read_metrics(run_dir)
    assert 2 <= len(before) < STEPS, f"the run was not interrupted mid-way (it logged {len(before)} steps)"
    r = checked(run_torchrun(4, run_dir, *overrides, timeout=300))   # train.resume=auto
    assert "F&B overlap off" in r.stdout
    start = int(re.search(r"resumed from \S+ at step (\d+)", r.stdout).group(1))
    return before, read_metrics(run_dir)[len(before):], start


def test_overlap_off_gives_bit_identical_losses(runs, killed_without_overlap):
    overlapped = {m["step"]: m for m in read_metrics(runs("dualpipe", 4, *composed("dualpipe")))}
    before, _, _ = killed_without_overlap
    for m in before:
        for k in KEYS:
            assert m[k] == overlapped[m["step"]][k], (m["step"], k, m[k], overlapped[m["step"]][k])


def test_killed_composed_run_resumes_bit_for_bit(runs, killed_without_overlap):
    """Expert slices of both stages on every rank, their AdamW moments, router biases and RNG restored."""
    uninterrupted = {m["step"]: m for m in read_metrics(runs("dualpipe", 4, *composed("dualpipe")))}
    before, resumed, start = killed_without_overlap
    assert 2 <= start <= len(before)
    assert [m["step"] for m in resumed] == list(range(start + 1, STEPS + 1))
    for m in resumed:
        for k in KEYS + ("lr",):
            assert m[k] == uninterrupted[m["step"]][k], (m["step"], k, m[k], uninterrupted[m["step"]][k])


def test_composed_checkpoint_resumes_under_ep2_alone_and_one_process(runs, args, tmp_path):
    """DCP by global names: the expert slices of each stage (DTensors on that stage's EDP x EP mesh),
    their moments and each stage's weights load into ep=2 without a pipeline and into one process;
    each continues like the pp=2 x ep=2 run (step 3's loss checks the weights, step 4 the moments)."""
    source = runs("1f1b", 4, *composed("1f1b"))
    checkpoint = step_dir(os.path.join(source, "checkpoints"), 2)
    to_ep2, to_single = str(tmp_path / "to_ep2"), str(tmp_path / "to_single")
    r1 = checked(run_torchrun(2, to_ep2, *args, "parallel=ep2", f"train.resume={checkpoint}", timeout=300))
    r2 = checked(run_pretrain(to_single, *args, f"train.resume={checkpoint}", timeout=300))
    for resumed, r in ((to_ep2, r1), (to_single, r2)):
        assert "resumed from" in r.stdout and "at step 2" in r.stdout
        continued = read_metrics(resumed)
        assert [m["step"] for m in continued] == [3, 4]
        assert_close(read_metrics(source)[2:], continued)


def test_fp8_inside_composed_plan_stays_in_the_fp8_band(runs):
    reference = read_metrics(runs("single_fp8", 1, "precision=fp8"))
    metrics = read_metrics(runs("dualpipe_fp8", 4, *composed("dualpipe"), "precision=fp8"))
    assert_close(reference, metrics, rtol=2e-3, keys=("loss", "mtp_loss"))
