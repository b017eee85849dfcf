"""End-to-end: the tiny experiment trains, and writes what a run must write."""
import os

from tests.helpers import read_metrics, run_pretrain


def test_moe_tiny_loss_falls_and_run_dir_is_complete(tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_pretrain(run_dir, "+experiment=moe_tiny", "train.max_steps=30", "train.resume=none")
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(run_dir)
    assert [x["step"] for x in m] == list(range(1, 31))
    for key in ("loss", "lr", "tokens_per_s", "max_vio", "mtp_loss", "grad_norm"):
        assert all(key in x for x in m), key
    first, last = sum(x["loss"] for x in m[:3]) / 3, sum(x["loss"] for x in m[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert "val_loss" in m[-1]
    assert "step 30/30" in r.stdout and "tok/s" in r.stdout and "maxvio" in r.stdout
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tb")))
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000030"))
