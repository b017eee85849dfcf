"""Expert parallelism through the real entry point (torchrun, gloo, fp32): ep=2 and ep=4 train like
one process, an ep=2 run is bit-reproducible and resumes bit-exactly after SIGKILL, and checkpoints
reshard between ep=2 and ep=1 in both directions.

Tolerance against the single process: gradients are summed in a different order (all-to-all backward,
all-reduces): ~1e-7 relative per step, compounding over a few AdamW steps; 1e-5 catches any real
difference (a wrong expert slice, gradient scale or router count changes the loss at 1e-3).
"""
import os
import re
import subprocess
import time

import pytest

from dsv3.train.checkpoint import latest_checkpoint, step_dir
from tests.helpers import (ROOT, assert_same_expert_loads, assert_same_losses, checked, kill_hard, read_metrics,
                           run_pretrain, run_torchrun, torchrun_cmd)

STEPS = 6
# bias_update_speed large enough that router bias updates (counts summed over all ranks) move the losses.
ARGS = ["+experiment=moe_tiny", f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
        "checkpoint.every=2", "checkpoint.keep=0", "train.bias_update_speed=0.01"]
# grad_norm: AdamW is nearly invariant to a gradient's scale, so a wrongly scaled expert gradient barely
# moves the losses; the global gradient norm shows it at once.
KEYS = ("loss", "mtp_loss", "max_vio", "grad_norm")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("single"))
    checked(run_pretrain(run_dir, *ARGS, "train.resume=none", timeout=300))
    return run_dir


@pytest.fixture(scope="module")
def ep2(tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("ep2"))
    checked(run_torchrun(2, run_dir, *ARGS, "parallel=ep2", "train.resume=none", timeout=300))
    return run_dir


def test_ep2_and_ep4_losses_equal_the_single_process_run(single, ep2, tmp_path):
    checked(run_torchrun(4, str(tmp_path), *ARGS, "parallel=ep4", "train.resume=none", timeout=300))
    reference = read_metrics(single)
    assert len(reference) == STEPS
    assert_same_losses(reference, read_metrics(ep2), rtol=1e-5, keys=KEYS)
    assert_same_losses(reference, read_metrics(str(tmp_path)), rtol=1e-5, keys=KEYS)
    for run_dir in (ep2, str(tmp_path)):  # each rank routes its own tokens: the counts summed over the EP group
        assert_same_expert_loads(single, run_dir, atol=1e-6)


def test_ep2_losses_are_the_same_bits_whichever_transport_moves_the_tokens(ep2, tmp_path):
    """The ep2 fixture runs the default transport, direct (both ranks on this node: rows written into the
    peer's shared memory); the library all-to-all gives the same bits, every step."""
    with open(os.path.join(ep2, "train.log")) as f:
        assert "ep=2, tokens move by direct" in f.read()
    checked(run_torchrun(2, str(tmp_path), *ARGS, "parallel=ep2", "parallel.ep_transport=all_to_all",
                         "train.resume=none", timeout=300))
    with open(os.path.join(tmp_path, "train.log")) as f:
        assert "ep=2, tokens move by all_to_all (as configured)" in f.read()
    direct, a2a = read_metrics(ep2), read_metrics(str(tmp_path))
    assert len(direct) == len(a2a) == STEPS
    for a, b in zip(direct, a2a):
        for k in KEYS + ("lr",):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])


def test_killed_ep2_run_repeats_and_resumes_bit_for_bit(ep2, tmp_path):
    """A second ep=2 run logs the same losses bit for bit; SIGKILLed after a checkpoint and resumed, it
    continues with exactly the uninterrupted run's losses (expert slices, their AdamW moments, router
    biases and RNG restored on both ranks)."""
    run_dir = str(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun_cmd(2, run_dir, *ARGS, "parallel=ep2"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if latest_checkpoint(os.path.join(run_dir, "checkpoints")):
                break
            time.sleep(0.05)
    finally:
        killed = kill_hard(proc)
    assert len(killed) >= 2, f"the workers had already exited: {killed}"
    before = read_metrics(run_dir)
    assert 2 <= len(before) < STEPS, f"the run was not interrupted mid-way (it logged {len(before)} steps)"

    r = checked(run_torchrun(2, run_dir, *ARGS, "parallel=ep2", timeout=300))  # train.resume=auto
    start = int(re.search(r"resumed from \S+ at step (\d+)", r.stdout).group(1))
    assert 2 <= start <= len(before)
    reference = {m["step"]: m for m in read_metrics(ep2)}
    resumed = read_metrics(run_dir)[len(before):]
    assert [m["step"] for m in resumed] == list(range(start + 1, STEPS + 1))
    for m in before + resumed:
        for k in KEYS + ("lr",):
            assert m[k] == reference[m["step"]][k], (m["step"], k, m[k], reference[m["step"]][k])


def test_checkpoints_reshard_between_ep2_and_ep1(single, ep2, tmp_path):
    """Resumed at step 4 with the other plan, each run continues like the run that wrote the checkpoint."""
    resume_args = [a for a in ARGS if not a.startswith("checkpoint.")] + ["checkpoint.every=0"]
    to_ep1, to_ep2 = str(tmp_path / "ep2_to_ep1"), str(tmp_path / "ep1_to_ep2")
    checked(run_pretrain(to_ep1, *resume_args, f"train.resume={step_dir(os.path.join(ep2, 'checkpoints'), 4)}",
                         timeout=300))
    checked(run_torchrun(2, to_ep2, *resume_args, "parallel=ep2",
                         f"train.resume={step_dir(os.path.join(single, 'checkpoints'), 4)}", timeout=300))
    for source, resumed in ((ep2, to_ep1), (single, to_ep2)):
        continued = read_metrics(resumed)
        assert [m["step"] for m in continued] == [5, 6]
        assert_same_losses(read_metrics(source)[4:], continued, rtol=1e-5, keys=KEYS)
