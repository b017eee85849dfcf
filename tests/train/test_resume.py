"""A run killed with SIGKILL and resumed with train.resume=auto gives exactly the per-step losses of an
uninterrupted run (CPU, fp32): same samples, same weights, optimizer moments, biases and schedules."""
import os
import signal
import subprocess
import time

from dsv3.train.checkpoint import latest_checkpoint
from tests.helpers import ROOT, pretrain_cmd, read_metrics, run_pretrain

ARGS = ["+experiment=moe_tiny", "train.max_steps=10", "checkpoint.every=3", "checkpoint.keep=0",
        "train.val_every=5", "train.bias_update_speed=0.01"]


def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    ref_dir, cut_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    r = run_pretrain(ref_dir, *ARGS, "train.resume=none")
    assert r.returncode == 0, r.stderr[-3000:]
    reference = {m["step"]: m for m in read_metrics(ref_dir)}
    assert sorted(reference) == list(range(1, 11))

    # Kill hard once a checkpoint exists and training has gone past it.
    proc = subprocess.Popen(pretrain_cmd(cut_dir, *ARGS), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = latest_checkpoint(os.path.join(cut_dir, "checkpoints"))
        metrics = os.path.join(cut_dir, "metrics.jsonl")
        if ckpt and ckpt.endswith("6") and os.path.exists(metrics) and len(read_metrics(cut_dir)) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(cut_dir))
    assert 7 <= killed_at < 10, f"the run was not interrupted mid-way (it logged {killed_at} steps)"

    r = run_pretrain(cut_dir, *ARGS)  # train.resume=auto is the default
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000006" in r.stdout
    records = read_metrics(cut_dir)
    resumed = {m["step"]: m for m in records[killed_at:]}
    assert sorted(resumed) == list(range(7, 11))
    for step, m in resumed.items():
        assert m["loss"] == reference[step]["loss"], (step, m["loss"], reference[step]["loss"])
        assert m["mtp_loss"] == reference[step]["mtp_loss"]
        assert m["lr"] == reference[step]["lr"]
        assert m["max_vio"] == reference[step]["max_vio"]  # router biases were restored too
    assert resumed[10]["val_loss"] == reference[10]["val_loss"]
