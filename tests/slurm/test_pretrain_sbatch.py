"""launch/slurm/pretrain.sbatch on a real SLURM cluster: two simulated hosts (network namespaces) running
Debian's slurmctld/slurmd, set up and torn down by tests/slurm/local_cluster.sh. The jobs train moe_tiny
on CPU nodes; a two-node job must rendezvous over the network and give the single-process losses."""
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, assert_same_losses, read_metrics

CLUSTER = os.path.join(ROOT, "tests", "slurm", "local_cluster.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm", "pretrain.sbatch")
STATE = "/tmp/dsv3-slurm"  # local_cluster.sh's default DSV3_SLURM_DIR
LOCK = "/tmp/dsv3-slurm.lock"  # the namespaces and the subnet are machine-wide: one cluster at a time
JOB_TIMEOUT = 300
TINY = ["+experiment=moe_tiny", "train.max_steps=2", "train.threads=1"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def _why_not_runnable() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root and apt to install slurm"
    have_slurm = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged", "ip"))
    if not have_slurm and not shutil.which("apt-get"):
        return "needs root and apt to install slurm"
    if not (shutil.which("unshare") and shutil.which("nsenter")) or subprocess.run(
            ["unshare", "--net", "true"], capture_output=True).returncode != 0:
        return "needs network namespaces (unshare --net) for the two simulated hosts"
    return None


needs_cluster = pytest.mark.skipif(_why_not_runnable() is not None, reason=str(_why_not_runnable()))


@pytest.mark.parametrize("script", [SBATCH, CLUSTER])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sbatch_script_run_outside_slurm_says_how_to_submit_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", SBATCH, "+experiment=moe_tiny"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "submit this with sbatch" in r.stderr, r.stderr


class Cluster:
    """Clients run on host 1, where the controller is reachable (nothing else can reach the subnet)."""

    def run(self, *cmd: str, env: dict | None = None, check: bool = True) -> str:
        r = subprocess.run([CLUSTER, "exec", *cmd], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env={**os.environ, **(env or {})})
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def submit(self, log: str, run_dir: str | None, *args: str, nodes: int = 1) -> str:
        """pretrain.sbatch on `nodes` CPU nodes with RUN_DIR=run_dir; args are Hydra overrides. Returns the
        job id."""
        out = self.run("sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", f"--output={log}",
                       SBATCH, *args, env={"RUN_DIR": run_dir} if run_dir else {})
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, log: str, until=lambda job: job["JobState"] in FINAL_STATES,
             timeout: float = JOB_TIMEOUT) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.3)
        self.run("scancel", job_id, check=False)
        pytest.fail(f"job {job_id} still {job['JobState']} after {timeout} s; its log:\n{_tail(log)}")


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path) as f:
            return f.read()[-n:]
    except FileNotFoundError:
        return f"({path} was not written)"


def _assert_completed(job: dict, log: str) -> None:
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"job {job['JobId']}:\n{_tail(log)}"


@pytest.fixture(scope="module")
def cluster():
    with open(LOCK, "w") as lock:
        deadline = time.time() + 600
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    pytest.fail(f"{LOCK} held by another test session for 600 s")
                time.sleep(1)
        up = subprocess.run([CLUSTER, "up"], capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stderr[-4000:]}"
        try:
            yield Cluster()
        finally:
            ours = _daemon_pids()
            down = subprocess.run([CLUSTER, "down"], capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stderr
            left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert "dsv3-n" not in left, f"namespaces left behind: {left}"
            alive = [p for p in ours if os.path.exists(f"/proc/{p}")]
            assert not alive, f"daemons left running: {alive}"


def _daemon_pids() -> list[int]:
    """The slurmctld, slurmd and (if local_cluster.sh started it) munged of our cluster."""
    run = os.path.join(STATE, "run")
    files = [os.path.join(run, f) for f in os.listdir(run)] if os.path.isdir(run) else []
    if os.path.exists(os.path.join(STATE, "munged.ours")):
        files.append("/run/munge/munged.pid")
    pids = []
    for f in files:
        with open(f) as fh:
            pids.append(int(fh.read().strip()))
    return pids


@pytest.fixture(scope="module")
def one_node_job(cluster, tmp_path_factory):
    """A one-node job (one process: also the reference losses for the two-node job). Submitted, not
    waited for: the requeue test asks for it first, so that it runs on the other node meanwhile."""
    d = tmp_path_factory.mktemp("one_node")
    log, run_dir = str(d / "job.out"), str(d / "run")
    return cluster.submit(log, run_dir, *TINY, nodes=1), log, run_dir


@needs_cluster
def test_time_limit_signal_requeues_the_job_and_it_resumes(cluster, one_node_job, tmp_path):
    """What --signal=B:USR1@300 does before the time limit, sent by hand: without a new checkpoint the
    job keeps running; with one it is requeued and the next attempt resumes from it, in the same run dir."""
    log, run_dir = str(tmp_path / "job.out"), str(tmp_path / "run")
    steps = 12  # ~0.5 s each with a checkpoint: seconds of margin for the signal after the first one
    # the run dir as an override this time: the script must find the checkpoints there
    job_id = cluster.submit(log, None, "+experiment=moe_tiny", f"train.max_steps={steps}", "train.threads=1",
                            "checkpoint.every=1", "checkpoint.keep=0", f"hydra.run.dir={run_dir}")
    # the header line comes after the trap is set; torch takes seconds to import, so no checkpoint yet
    cluster.wait(job_id, log, until=lambda job: job["JobState"] in FINAL_STATES or "dsv3: job" in _tail(log))
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000001")
    cluster.wait(job_id, log, until=lambda job: job["JobState"] in FINAL_STATES or os.path.isdir(ckpt))
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    job = cluster.wait(job_id, log, until=lambda job: job["Restarts"] == "1" and job["JobState"] == "PENDING"
                       or job["JobState"] in FINAL_STATES)
    assert job["Restarts"] == "1", f"not requeued:\n{_tail(log)}"
    # SLURM holds a requeued job for ~2 minutes (BeginTime); an admin may release it at once.
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = cluster.wait(job_id, log)
    _assert_completed(job, log)

    text = _tail(log, 100_000)
    assert "no new checkpoint" in text and "not requeueing" in text
    assert re.search(r"requeueing job \d+ to resume from step_\d+", text), text[-4000:]
    # the trainer may finish one more checkpoint before the requeue stops it: take the one it resumed from
    resumed = re.search(r"restart 1 on dsv3-n\d \(1 nodes x 1 processes\), rendezvous 10\.99\.17\.\d:\d+, "
                        rf"run dir {re.escape(run_dir)}, latest checkpoint step_(\d+)", text)
    assert resumed, text[-4000:]
    k = int(resumed.group(1))
    assert f"at step {k}" in text  # the trainer's "resumed from ... at step k"
    records = read_metrics(run_dir)
    assert sorted(m["step"] for m in records if m["step"] <= k) == list(range(1, k + 1))
    later = [m for m in records if m["step"] > k]
    second = later[len(later) - (steps - k):]  # the second attempt's records: steps k+1 .. the last
    assert [m["step"] for m in second] == list(range(k + 1, steps + 1))
    # steps the first attempt ran past its last checkpoint were run again, identically
    again = {m["step"]: m for m in second}
    for m in later[:len(later) - (steps - k)]:
        assert m["loss"] == again[m["step"]]["loss"], m["step"]


@needs_cluster
def test_one_node_job_completes_and_writes_the_run_dir(cluster, one_node_job):
    job_id, log, run_dir = one_node_job
    job = cluster.wait(job_id, log)
    _assert_completed(job, log)
    assert job["NumNodes"] == "1"
    assert "world size 1" in _tail(log)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000002"))


@needs_cluster
def test_two_node_job_spans_both_hosts_and_matches_one_process(cluster, one_node_job, tmp_path):
    log, run_dir = str(tmp_path / "job.out"), str(tmp_path / "run")
    job = cluster.wait(cluster.submit(log, run_dir, *TINY, nodes=2), log)
    _assert_completed(job, log)
    assert job["NodeList"] == "dsv3-n[1-2]"
    # the whole log: when the first node's agent (the rendezvous store's host) exits first, torchrun on
    # the second logs a RendezvousConnectionError while shutting down (the job has completed), which can
    # push these lines out of a tail
    text = _tail(log, n=10 ** 7)
    assert "world size 2" in text
    assert "rendezvous 10.99.17.1:" in text  # the first node's address, reached from the second host
    # 2-way data parallel over the same global batch gives the single-process losses (fp32; only the
    # order of the gradient sum differs)
    one_id, one_log, one_run_dir = one_node_job
    _assert_completed(cluster.wait(one_id, one_log), one_log)
    assert_same_losses(read_metrics(one_run_dir), read_metrics(run_dir), rtol=1e-5)


@needs_cluster
def test_job_outside_the_checkout_fails_with_a_clear_error(cluster, tmp_path):
    log = str(tmp_path / "job.out")
    out = cluster.run("sbatch", "--parsable", "--gpus-per-node=0", f"--output={log}", SBATCH, *TINY,
                      env={"DSV3_ROOT": str(tmp_path)})
    job = cluster.wait(out.strip().split(";")[0], log)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), _tail(log)
    assert f"{tmp_path}/launch/pretrain.py not found: submit from the dsv3 checkout or set DSV3_ROOT" in _tail(log)
