"""Seq1F1B through the real entry point (torchrun, gloo, fp32): pp=2 with every sequence in 4 segments
trains moe_tiny (MTP on, MoE layers on both stages) like one process, losses and gradient norm within
1e-5 over 3 steps, the sequence-wise balance loss on (a large alpha, so that its gradient counts): its f
is over the whole sequence, which no segment sees alone."""
from tests.helpers import assert_same_losses, read_metrics, run_pretrain, run_torchrun

ARGS = ["+experiment=moe_tiny", "model.n_layers=4", "model.mtp_depth=2", "data.seq_len=32", "train.max_steps=3",
        "train.global_batch_size=4", "train.micro_batch_size=1", "train.val_samples=4", "train.val_every=3",
        "train.balance_loss_alpha=0.01", "train.bias_update_speed=0.01", "train.resume=none"]


def test_seq1f1b_trains_like_one_process(tmp_path):
    from dsv3.config.schema import DataConfig
    from dsv3.data.embedded import stdlib_shards

    args = ARGS + ["data=shards", f"data.path={stdlib_shards(DataConfig(), 512)}"]
    single, seq = str(tmp_path / "single"), str(tmp_path / "seq1f1b")
    r = run_pretrain(single, *args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_torchrun(2, seq, *args, "parallel.pp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=4",
                     timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "4 segments" in r.stdout + r.stderr
    assert_same_losses(read_metrics(single), read_metrics(seq), rtol=1e-5, keys=("loss", "mtp_loss", "grad_norm",
                                                                                     "max_vio", "balance_loss"))
    (a,), (b,) = ([m["val_loss"] for m in read_metrics(run) if "val_loss" in m] for run in (single, seq))
    assert abs(a - b) <= 1e-5 * a          # the held-out loss: whole sequences through the stages
