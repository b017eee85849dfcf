"""ZeRO data parallelism through DeepSpeed, composed with experts and pipeline stages, through the real
entry point (torchrun, gloo, 4 ranks), against the single process (fp32, 1e-5 relative: losses, the
global gradient norm, MaxVio, the held-out loss). What differs from one process is the order of some
sums (DeepSpeed's bucketed reduce-scatter, the partitioned norm): ~1e-7 per step; a wrong partition,
gradient scale or missed reduction shows at 1e-3 (grad_norm at once).

- dp=4 ZeRO-1 from scratch, and ZeRO-2 dp=4 resumed from a single-process checkpoint (resharding into
  partitions): each rank's optimizer state (AdamW moments, measured from the tensors) is 1/4 of the
  single process's, up to DeepSpeed's alignment padding.
- dp=2 x ep=2 ZeRO-1 (expert partitions over their EDP group); its checkpoint resumes in one process.
- pp=2 x dp=2 ZeRO-1 under 1F1B, and under DualPipe with experts (pp=2 x ep=2, the all-to-all overlap on),
  each with activation checkpointing (full blocks; attention).
- optimizer offload (DeepSpeed's CPU Adam) with full activation checkpointing, one process, the
  single-card setting: equal to no offload within CPU Adam's rounding (1e-5).

DeepSpeed compiles CPU Adam on first use (about a minute, cached in torch's extension directory under
the user cache for every later run). About 7 minutes on 2 cores.
"""
import os

import pytest

from dsv3.train.checkpoint import step_dir
from tests.helpers import assert_same_losses, read_metrics
from tests.parallel.plan_testing import PLAN_KEYS

STEPS = 4
KEYS = PLAN_KEYS
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(plan_runs):
    """run(name, nproc, *overrides) -> (run directory, stdout): the session's run of those overrides."""
    return lambda name, nproc, *overrides: plan_runs(STEPS, nproc, *overrides)


def assert_close(reference: list[dict], other: list[dict], rtol: float = RTOL) -> None:
    assert len(other) > 0
    by_step = {m["step"]: m for m in reference}
    assert_same_losses([by_step[m["step"]] for m in other], other, rtol=rtol, keys=KEYS)
    if "val_loss" in other[-1]:
        assert abs(other[-1]["val_loss"] - by_step[other[-1]["step"]]["val_loss"]) <= rtol * other[-1]["val_loss"]


def assert_quarter_of(single: list[dict], sharded: list[dict]) -> None:
    """Each rank's moments are 1/4 of the whole: DeepSpeed pads each flat group to a multiple of 2 x
    its dp size, so a rank holds at most 8 values per group (of 2 moments x 4 bytes) more."""
    whole = single[0]["optim_state_bytes"][0]
    per_rank = sharded[0]["optim_state_bytes"]
    assert len(per_rank) == 4
    for b in per_rank:
        assert abs(b - whole / 4) <= 4 * 8 * 2 * 4 + 64, (b, whole / 4)


def test_zero1_dp4_trains_like_one_process_on_a_quarter_of_the_state(runs):
    single = read_metrics(runs("single", 1)[0])
    run_dir, out = runs("zero1_dp4", 4, "parallel.zero=1")
    assert "dp=4, ZeRO-1" in out
    metrics = read_metrics(run_dir)
    assert_close(single, metrics)
    assert_quarter_of(single, metrics)


def test_single_process_checkpoint_resumes_under_zero2_dp4(runs):
    """The checkpoint's whole moments are scattered into ZeRO-2's partitions: steps 3 and 4 are the
    single process's (step 4 checks the moments), on a quarter of the state per rank."""
    single_dir, _ = runs("single", 1)
    checkpoint = step_dir(os.path.join(single_dir, "checkpoints"), 2)
    run_dir, out = runs("zero2_dp4_resumed", 4, "parallel.zero=2", f"train.resume={checkpoint}")
    assert "ZeRO-2" in out and "at step 2" in out
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [3, 4]
    assert_close(read_metrics(single_dir), metrics)
    assert_quarter_of(read_metrics(single_dir), metrics)


def test_zero1_with_experts_and_its_checkpoint_in_one_process(runs):
    single = read_metrics(runs("single", 1)[0])
    run_dir, out = runs("zero1_dp2_ep2", 4, "parallel.ep=2", "parallel.zero=1")
    assert "dp=4 x ep=2" in out and "ZeRO-1" in out
    assert_close(single, read_metrics(run_dir))
    checkpoint = step_dir(os.path.join(run_dir, "checkpoints"), 2)
    resumed_dir, out = runs("from_zero1_ep2", 1, f"train.resume={checkpoint}")
    assert "at step 2" in out
    assert [m["step"] for m in read_metrics(resumed_dir)] == [3, 4]
    assert_close(single, read_metrics(resumed_dir))


@pytest.mark.parametrize("name,overrides", [
    # activation checkpointing rides along: recomputation inside the executor's stages (full blocks
    # under 1F1B; attention only under DualPipe, whose F&B pairs cannot recompute MoE layers)
    ("pp2_1f1b", ("parallel.pp=2", "parallel.pp_schedule=1f1b", "train.activation_checkpointing=full")),
    ("pp2_ep2_dualpipe", ("parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipe",
                          "train.activation_checkpointing=attention")),
])
def test_zero1_inside_pipeline_stages_trains_like_one_process(runs, name, overrides):
    single = read_metrics(runs("single", 1)[0])
    run_dir, out = runs(name, 4, *overrides, "parallel.zero=1")
    assert "pp=2" in out and "ZeRO-1" in out and "activation checkpointing" in out
    assert_close(single, read_metrics(run_dir))


def test_offload_with_full_checkpointing_equals_no_offload(runs):
    """DeepSpeed's CPU Adam computes AdamW with its own (vectorized) rounding: 1e-5 relative still."""
    single = read_metrics(runs("single", 1)[0])
    run_dir, out = runs("offload", 1, "parallel.offload_optimizer=true", "train.activation_checkpointing=full")
    assert "optimizer offload (DeepSpeed CPU Adam)" in out and "activation checkpointing: full" in out
    assert_close(single, read_metrics(run_dir))
