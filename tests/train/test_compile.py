"""train.compile=true: the compiled regions (dsv3/train/compile.py) train to the eager run's losses.

Tolerance: inductor fuses the regions' element-wise ops and may reorder fp32 sums; each changes a value
by ~1e-7 relative, and four optimizer steps compound that to ~1e-6 (measured: equal to 6 digits), so
5e-5 on every step's losses leaves room without hiding a wrong kernel (a mis-compiled norm or RoPE moves
the first loss by > 1e-3)."""
import os

from tests.helpers import assert_same_losses, read_metrics, run_pretrain


def test_compiled_run_equals_eager(tmp_path):
    common = ["+experiment=moe_tiny", "train.max_steps=4", "train.resume=none", "checkpoint.every=0",
              "train.val_every=2"]
    eager = run_pretrain(str(tmp_path / "eager"), *common)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run_pretrain(str(tmp_path / "compiled"), *common, "train.compile=true",
                            env={"TORCHINDUCTOR_CACHE_DIR": os.path.join(str(tmp_path), "inductor")})
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "train.compile:" in compiled.stdout and "regions compiled" in compiled.stdout
    a, b = read_metrics(str(tmp_path / "eager")), read_metrics(str(tmp_path / "compiled"))
    assert_same_losses(a, b, rtol=5e-5, keys=("loss", "mtp_loss", "grad_norm"))
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 5e-5 * a[-1]["val_loss"]
