"""The prepared GPU check is tested here, without a GPU: its quick dry run goes through every step
(install/build, environment, a test of each tests/gpu module in the Triton interpreter, a kernel
check, a training-throughput run) and writes the summary, so the script cannot rot between GPU loans."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_dry_run_passes_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--dry-run", "--quick", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps if s[0] != "build"] == ["env", "tests", "fp8_quant", "dispatch", "train_small"]
    assert all(s[1] == "0" for s in steps), steps
    summary = (out / "summary.md").read_text()
    assert "4 passed, 0 failed, 0 skipped" in summary
    assert "dry run: nothing below is a GPU measurement" in summary
    assert "| dsv3 bf16 (no MTP) |" in summary


def test_quick_is_refused_outside_a_dry_run():
    r = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--quick"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--quick is a mode of --dry-run" in r.stderr
