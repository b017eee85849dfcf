"""SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) mid-run: every rank finishes the step, the same checkpoint is saved,
the process exits with 128 + the signal, and resuming reproduces the uninterrupted losses exactly.
A second Ctrl-C abandons the step."""
import os
import signal
import subprocess
import time

import pytest

from dsv3.train.checkpoint import latest_checkpoint
from dsv3.train.stop_signals import StopSignals
from tests.helpers import ROOT, assert_same_losses, pretrain_cmd, read_metrics, run_pretrain, torchrun_cmd

ARGS = ["+experiment=moe_tiny", "train.max_steps=12", "checkpoint.every=0", "train.val_every=0"]


def interrupt_after(cmd: list[str], run_dir: str, steps: int, signum: int, env=None) -> tuple[int, str]:
    """Start `cmd`, send `signum` once `steps` steps are logged; (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(read_metrics(run_dir)) >= steps:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("reference"))
    r = run_pretrain(run, *ARGS, "train.resume=none")
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_stop_signal_saves_the_step_and_resuming_continues_exactly(signum, reference, tmp_path):
    run = str(tmp_path / "run")
    code, out = interrupt_after(pretrain_cmd(run, *ARGS), run, 3, signum)
    assert code == 128 + signum, out[-3000:]
    stopped_at = read_metrics(run)[-1]["step"]
    assert 3 <= stopped_at < 12, f"not stopped mid-run ({stopped_at} steps)"
    assert latest_checkpoint(os.path.join(run, "checkpoints")).endswith(f"step_{stopped_at:08d}")
    assert f"stopping after step {stopped_at} on {signal.Signals(signum).name}" in out

    r = run_pretrain(run, *ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step_{stopped_at:08d}" in r.stdout
    assert_same_losses(reference, read_metrics(run), rtol=0)


def test_with_checkpoint_on_signal_off_sigterm_ends_the_run_unsaved(tmp_path):
    run = str(tmp_path / "run")
    code, out = interrupt_after(pretrain_cmd(run, *ARGS, "checkpoint.on_signal=false"), run, 2, signal.SIGTERM)
    assert code == -signal.SIGTERM, out[-3000:]
    assert latest_checkpoint(os.path.join(run, "checkpoints")) is None


@pytest.mark.parametrize("plan", ["parallel=single", "parallel=pp2"], ids=["dp2", "pp2"])
def test_torchrun_ranks_agree_on_the_step_they_stop_at(plan, reference, tmp_path):
    """SIGTERM to torchrun reaches both ranks (data-parallel, or the two pipeline stages) at different
    points of a step; they still save one common step, and the resumed run matches the single process."""
    run = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*ARGS, plan]
    code, out = interrupt_after(torchrun_cmd(2, run, *args), run, 3, signal.SIGTERM, env=env)
    assert code != 0, out[-3000:]
    stopped_at = read_metrics(run)[-1]["step"]
    assert latest_checkpoint(os.path.join(run, "checkpoints")).endswith(f"step_{stopped_at:08d}"), out[-3000:]

    r = subprocess.run(torchrun_cmd(2, run, *args), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(reference, read_metrics(run), rtol=1e-5)


def test_a_second_ctrl_c_abandons_the_step_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    with StopSignals(True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert stop.received == signal.SIGINT and stop.agreed("cpu") == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before  # restored on exit
