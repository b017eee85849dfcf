"""How much of the expert all-to-all DualPipe's F&B pairs hide: parallel.overlap on vs off, same run.

    sudo python benchmarks/overlap.py          # ~10 minutes on 2 cores; writes docs/overlap.json

Two simulated hosts (network namespaces joined by a veth pair) whose link is slowed with a token
bucket (`tc qdisc ... tbf`), so that an all-to-all costs about as much as the computation it should
hide, as NVLink/InfiniBand relate to H800 compute in V3's training. Two layouts, each with the
overlap on and off, alternating (`--repeats` times each):

- `pp2_ep2_dualpipe`: 4 ranks, pp=2 x ep=2 with DualPipe. Host 1 runs ranks 0 and 2 (data-parallel
  rank 0 of both stages), host 2 ranks 1 and 3, so every EP group ({0, 1} and {2, 3}) spans the slow
  link and the pipeline's P2P stays inside a host. Four ranks on a 2-core machine: while one rank
  waits, another computes, so the machine is busy either way (see docs/parallelism.md).
- `ep2`: 2 ranks, one per host, a core each: the accumulation's F&B pairs (forward of micro-batch
  j+1 with backward of j), the same mechanism without CPU oversubscription.

Reported from rank 0's metrics (steps after the first, without the last, which also evaluates):
step time; the all-to-all time with the overlap off (issue to completion: what it costs; inside the
F&B pairs for DualPipe, all of the step's for ep2, whose pairs exist only with the overlap on) and
what of it is still exposed with the overlap on (time spent waiting); hidden = 1 - exposed(on) /
cost(off); the step time saved per second of that all-to-all.

Safety: the namespaces have no default route, and while they exist the root namespace routes the
test subnet to `unreachable`, so nothing sent to those addresses outside the namespaces leaves the
machine. Everything is torn down at the end, also on an error or Ctrl-C. Needs root, `ip` and `tc`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")
sys.path.insert(0, ROOT)

HOSTS = ("dsv3ov1", "dsv3ov2")
PORT = 29517
# name: (ranks on host 1, ranks on host 2), plan overrides. Every EP group spans the link; pipeline
# neighbours ({0, 2}, {1, 3}) share a host.
LAYOUTS = {
    "ep2": (((0,), (1,)), ["parallel.ep=2"]),
    "pp2_ep2_dualpipe": (((0, 2), (1, 3)), ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipe"]),
}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class SlowLink:
    """Two network namespaces joined by a veth pair rate-limited by tbf in both directions."""

    def __init__(self, subnet: str, rate: str, burst: str):
        self.subnet, self.rate, self.burst = subnet, rate, burst
        self.ips = (f"{subnet}.1", f"{subnet}.2")

    def __enter__(self) -> "SlowLink":
        self.down()
        try:
            # the guard first: outside the namespaces the test subnet goes nowhere
            sh("ip", "route", "replace", "unreachable", f"{self.subnet}.0/24")
            for ns in HOSTS:
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", "eth0", "netns", HOSTS[0], "type", "veth", "peer", "name", "eth0", "netns", HOSTS[1])
            for ns, ip in zip(HOSTS, self.ips):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate,
                   "burst", self.burst, "latency", "200ms")
            for _ in range(100):
                if all(" UP " in sh("ip", "-n", ns, "-br", "link", "show", "eth0").stdout for ns in HOSTS):
                    break
                time.sleep(0.05)
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def down(self) -> None:
        listed = sh("ip", "netns", "list", check=False).stdout.split()
        for ns in HOSTS:
            if ns in listed:
                for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                    try:  # only our ranks can be in there
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                sh("ip", "netns", "del", ns, check=False)
        sh("ip", "route", "del", "unreachable", f"{self.subnet}.0/24", check=False)

    def launch(self, host: int, rank: int, local_rank: int, world: int, args: list[str], log) -> subprocess.Popen:
        env = {**os.environ, "MASTER_ADDR": self.ips[0], "MASTER_PORT": str(PORT), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(local_rank), "GLOO_SOCKET_IFNAME": "eth0",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{HOSTS[host]}", sys.executable, PRETRAIN, *args],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def train_args(run_dir: str, steps: int, overlap: bool, data_path: str, plan: list[str], extra: list[str]) -> list[str]:
    # moe_tiny with 4 layers, made wider where it computes (attention heads, expert width) but not in what
    # it sends (dim), so that computation can cover the all-to-alls.
    return [f"hydra.run.dir={run_dir}", "+experiment=moe_tiny", "model.n_layers=4", "model.dim=128",
            "model.moe_inter_dim=384", "model.n_heads=8", "data=shards", f"data.path={data_path}",
            "data.seq_len=128", f"train.max_steps={steps}", "train.global_batch_size=16",
            "train.micro_batch_size=1", "train.val_samples=2", "train.threads=1", "train.resume=none",
            "checkpoint.every=0", "checkpoint.keep=1", *plan, f"parallel.overlap={str(overlap).lower()}",
            # through the slow link: the direct transport would use the memory the namespaces share
            "parallel.ep_transport=all_to_all", *extra]


def run_once(link: SlowLink, layout: str, overlap: bool, steps: int, data_path: str, extra: list[str],
             timeout: float) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"dsv3_overlap_{'on' if overlap else 'off'}_")
    ranks_of_host, plan = LAYOUTS[layout]
    args = train_args(run_dir, steps, overlap, data_path, plan, extra)
    world = sum(len(r) for r in ranks_of_host)
    procs = []
    with open(os.path.join(run_dir, "ranks.log"), "w") as log:
        try:
            for host, ranks in enumerate(ranks_of_host):
                for local, rank in enumerate(ranks):
                    procs.append(link.launch(host, rank, local, world, args, log))
            deadline = time.time() + timeout
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if any(p.returncode for p in procs):
        with open(os.path.join(run_dir, "ranks.log")) as f:
            raise RuntimeError(f"a rank failed (overlap={overlap}):\n{f.read()[-4000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    shutil.rmtree(run_dir, ignore_errors=True)
    steady = metrics[1:-1]   # not the first (warm-up) nor the last (it also evaluates)
    keys = ("step_time_s", "a2a_s", "a2a_exposed_s", "a2a_pair_s", "a2a_pair_exposed_s", "loss")
    return {"layout": layout, "overlap": overlap, "steps": len(steady),
            **{k: statistics.mean(m.get(k, 0.0) for m in steady) for k in keys},
            "losses": [m["loss"] for m in metrics]}


def summarize(runs: list[dict]) -> dict:
    on = [r for r in runs if r["overlap"]]
    off = [r for r in runs if not r["overlap"]]

    def mean(rs, k):
        return statistics.mean(r[k] for r in rs)

    # With the overlap off every all-to-all blocks, so its time is what it costs. DualPipe pairs its
    # chunks either way (compare inside the pairs); the accumulation pairs only with the overlap on
    # (compare every all-to-all of the step).
    pairs_off = mean(off, "a2a_pair_s") > 0
    cost = mean(off, "a2a_pair_s" if pairs_off else "a2a_s")
    exposed = mean(on, "a2a_pair_exposed_s" if pairs_off else "a2a_exposed_s")
    step_on, step_off = mean(on, "step_time_s"), mean(off, "step_time_s")
    return {"compared": "all-to-alls inside F&B pairs" if pairs_off else "all all-to-alls",
            "step_s_on": step_on, "step_s_off": step_off, "speedup": step_off / step_on,
            "a2a_s_off": mean(off, "a2a_s"), "compared_a2a_s_off": cost, "compared_a2a_exposed_s_on": exposed,
            "hidden_fraction": 1 - exposed / cost, "step_saved_per_compared_a2a_s": (step_off - step_on) / cost,
            "compute_and_bubbles_s_off": step_off - mean(off, "a2a_s"),
            "losses_identical": all(r["losses"] == runs[0]["losses"] for r in runs)}


def table(s: dict) -> str:
    rows = [("step time, overlap off", f"{1e3 * s['step_s_off']:.0f} ms"),
            ("step time, overlap on", f"{1e3 * s['step_s_on']:.0f} ms ({s['speedup']:.2f}x)"),
            ("all-to-all per step, overlap off (all / compared)",
             f"{1e3 * s['a2a_s_off']:.0f} / {1e3 * s['compared_a2a_s_off']:.0f} ms"),
            ("step time minus all-to-all, overlap off (compute + bubbles)",
             f"{1e3 * s['compute_and_bubbles_s_off']:.0f} ms"),
            ("compared all-to-all still exposed, overlap on", f"{1e3 * s['compared_a2a_exposed_s_on']:.0f} ms"),
            ("compared all-to-all hidden", f"{100 * s['hidden_fraction']:.0f}%"),
            ("step time saved per second of compared all-to-all", f"{s['step_saved_per_compared_a2a_s']:.2f}"),
            ("losses of all runs bit-identical", str(s["losses_identical"]))]
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="96mbit", help="tbf rate of the link, each direction (tc units)")
    ap.add_argument("--burst", default="16kb", help="tbf bucket size (tc units)")
    ap.add_argument("--subnet", default="10.99.0", help="first three octets of the test subnet (a /24)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "overlap.json"))
    ap.add_argument("overrides", nargs="*", help="further config overrides for every run")
    a = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        sys.exit("benchmarks/overlap.py needs root and iproute2 (ip, tc): it creates network namespaces")

    from dsv3.config.schema import DataConfig
    from dsv3.data.embedded import stdlib_shards

    data_path = stdlib_shards(DataConfig(), 512)   # tokenized once here, not by every rank
    runs = []
    layouts = a.layouts.split(",")
    with SlowLink(a.subnet, a.rate, a.burst) as link:
        for i in range(a.repeats):
            for layout in layouts:
                for overlap in (True, False):
                    t0 = time.time()
                    runs.append(run_once(link, layout, overlap, a.steps, data_path, a.overrides, a.timeout))
                    r = runs[-1]
                    print(f"[{i + 1}/{a.repeats}] {layout} overlap {'on ' if overlap else 'off'}: step "
                          f"{1e3 * r['step_time_s']:.0f} ms, "
                          f"all-to-all {1e3 * r['a2a_s']:.0f} ms ({1e3 * r['a2a_exposed_s']:.0f} exposed), in pairs "
                          f"{1e3 * r['a2a_pair_s']:.0f} ms ({1e3 * r['a2a_pair_exposed_s']:.0f} exposed) "
                          f"[{time.time() - t0:.0f} s]", flush=True)
    result = {"setup": {"rate": a.rate, "burst": a.burst, "steps": a.steps, "repeats": a.repeats,
                        "layouts": {k: LAYOUTS[k] for k in layouts},
                        "model": "moe_tiny, 4 layers, dim 128, 8 heads, expert width 384, 16 sequences of 128 "
                                 "tokens per step in micro-batches of one", "overrides": a.overrides,
                        "cpus": os.cpu_count()},
              "runs": runs, "summary": {k: summarize([r for r in runs if r["layout"] == k]) for k in layouts}}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| | " + " | ".join(layouts) + " |\n|---|" + "---|" * len(layouts))
    tables = [table(result["summary"][k]).splitlines() for k in layouts]
    for rows in zip(*tables):
        cells = [r.split(" | ") for r in rows]
        print(f"{cells[0][0]} | " + " | ".join(c[1].rstrip(" |") for c in cells) + " |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
