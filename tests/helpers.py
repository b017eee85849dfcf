"""Running the real entry points as users do: subprocesses, with their exit codes and run directories."""
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")


def pretrain_cmd(run_dir: str, *overrides: str) -> list[str]:
    # One thread per process: tests run next to each other on 2 cores, and oversubscribed OpenMP
    # threads spin rather than sleep.
    # train.device=cpu: these tests mean the CPU, also on a machine with a GPU (a test may override it).
    return [sys.executable, PRETRAIN, f"hydra.run.dir={run_dir}", "train.threads=1", "train.device=cpu", *overrides]


def run_pretrain(run_dir: str, *overrides: str, timeout: int = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """`env`: variables added to the environment (e.g. WORLD_SIZE, to validate as one rank of a larger run)."""
    return subprocess.run(pretrain_cmd(run_dir, *overrides), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=None if env is None else {**os.environ, **env})


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_same_expert_loads(reference_dir: str, other_dir: str, atol: float) -> None:
    """expert_load.jsonl of two runs: the same records, every layer's per-expert shares within atol."""
    def read(run_dir: str) -> list[dict]:
        with open(os.path.join(run_dir, "expert_load.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    a, b = read(reference_dir), read(other_dir)
    assert [(r["step"], r["steps"]) for r in a] == [(r["step"], r["steps"]) for r in b] and a
    for ra, rb in zip(a, b):
        assert len(ra["load"]) == len(rb["load"])
        for la, lb in zip(ra["load"], rb["load"]):
            assert max(abs(x - y) for x, y in zip(la, lb)) <= atol, (ra["step"], la, lb)


def torchrun_cmd(nproc: int, run_dir: str, *overrides: str) -> list[str]:
    """The same entry point under torchrun (--standalone picks a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            PRETRAIN, f"hydra.run.dir={run_dir}", "train.threads=1", "train.device=cpu", *overrides]


def run_torchrun(nproc: int, run_dir: str, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun_cmd(nproc, run_dir, *overrides), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def assert_same_losses(reference: list[dict], other: list[dict], rtol: float, keys=("loss", "mtp_loss")) -> None:
    assert [m["step"] for m in reference] == [m["step"] for m in other]
    for a, b in zip(reference, other):
        for k in keys:
            assert abs(a[k] - b[k]) <= rtol * abs(a[k]), (a["step"], k, a[k], b[k])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for child in children:
            found += [child] + descendants(child)
    return found


def kill_hard(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a launcher and every process under it, as a machine failure would; returns the pids killed
    below it. (torchrun starts its workers in sessions of their own, so killing its group misses them.)"""
    below = descendants(proc.pid)
    for pid in [proc.pid] + below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return below


def checked(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run's result, after asserting it succeeded (its output's tails in the failure message)."""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r
