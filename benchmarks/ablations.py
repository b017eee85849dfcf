"""The DeepSeek-V3 report's claims at small scale: load balancing, MTP, FP8 vs BF16, layer-wise LRs.

    python benchmarks/ablations.py [--seeds 1 2 3] [--steps 400] [--jobs 2] [--skip-train]

Every contender is the real entry point (`launch/pretrain.py`) on the same base: `+experiment=moe_tiny`
(every V3 feature: MLA, 8 routed experts top-2 in 2 groups limited to 1, a shared expert, sigmoid
routing, MTP depth 1), sequences of 64 tokens, 16 per step, warmup 20 then cosine to the last step,
the same data order and initialization for a given seed. A contender differs from `v3` (the report's
setting) by the overrides listed in CONTENDERS, nothing else:

- load balancing: `v3` (bias, gamma = 1e-3, plus the sequence-wise loss at alpha = 1e-4), `loss_free`
  (bias only: Wang et al., 2024), `loss_free_fast` (bias only, gamma = 1e-2: the bias moves by gamma
  per step, and at 1e-3 it is still converging after 250 steps), `aux_loss` (no bias, the balance loss
  only, alpha picked below), `no_balance` (neither);
- MTP: `no_mtp` (model.mtp_depth=0);
- precision: `bf16` (autocast, fp32 master weights and moments), `fp8` (the FP8 preset: E4M3 GEMMs,
  emulated on CPU, BF16 moments), against `v3` (fp32); and `fp32_mb8`, fp32 in two micro-batches of 8
  instead of one of 16: the same data and arithmetic summed in another order, i.e. how far two runs drift
  apart from rounding differences alone (the floor under any precision comparison of whole runs);
- layer-wise learning rates: `layer_lr` (optim.layer_lr_decay=0.8).

alpha of `aux_loss`, as Wang et al. pick theirs: a sweep over ALPHAS on the first seed (their Fig. 2
shows the dilemma: a larger alpha balances better and costs perplexity), taking the largest alpha whose
held-out loss is within ALPHA_TOLERANCE of the unbalanced run's, i.e. the most balance that costs no
measurable loss; the other seeds run at that alpha.

Runs live in runs/ablations/<contender>/seed<k>/ and are reused when complete, so an interrupted
invocation continues where it stopped. Results: docs/ablations.json and docs/img/ablation_*.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")
RUNS = os.path.join(ROOT, "runs", "ablations")
WARMUP = 20
ALPHAS = (1e-3, 1e-2, 1e-1)
ALPHA_TOLERANCE = 0.005  # relative held-out loss
LAYER_LR_DECAY = 0.8
NO_BIAS = "train.bias_update_speed=0"
CONTENDERS = {
    "v3": [],
    "loss_free": ["train.balance_loss_alpha=0"],
    "loss_free_fast": ["train.balance_loss_alpha=0", "train.bias_update_speed=0.01"],
    "aux_loss": [NO_BIAS],  # + train.balance_loss_alpha=<picked>
    "no_balance": [NO_BIAS, "train.balance_loss_alpha=0"],
    "no_mtp": ["model.mtp_depth=0"],
    "bf16": ["precision=bf16"],
    "fp8": ["precision=fp8"],
    "layer_lr": [f"optim.layer_lr_decay={LAYER_LR_DECAY}"],
    "fp32_mb8": ["train.micro_batch_size=8"],
}
BALANCE = ("v3", "loss_free", "loss_free_fast", "aux_loss", "no_balance")
PRECISION = ("bf16", "fp8", "fp32_mb8")


def base_overrides(steps: int, seed: int) -> list[str]:
    return ["+experiment=moe_tiny", "data.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16",
            f"train.max_steps={steps}", f"optim.warmup_steps={WARMUP}", f"optim.decay_steps={steps - WARMUP}",
            "train.val_every=50", "train.val_samples=128", "train.log_every=1", "checkpoint.every=0",
            "train.resume=none", "train.threads=1", "train.device=cpu", f"train.seed={seed}"]


def alpha_name(alpha: float) -> str:
    return f"aux_loss_alpha{alpha:g}"


# -- running --------------------------------------------------------------------------------------------
def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def complete(run_dir: str, steps: int) -> bool:
    records = read_metrics(run_dir)
    return bool(records) and records[-1]["step"] == steps and len(records) == steps


def command(name: str, overrides: list[str], steps: int, seed: int) -> tuple[str, list[str]]:
    run_dir = os.path.join(RUNS, name, f"seed{seed}")
    return run_dir, [sys.executable, PRETRAIN, *base_overrides(steps, seed), *overrides, f"hydra.run.dir={run_dir}"]


def running_elsewhere(run_dir: str) -> bool:
    """A training process for `run_dir` is alive (started by an earlier, interrupted invocation)."""
    needle = f"hydra.run.dir={run_dir}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read().split(b"\0"):
                    return True
        except OSError:
            continue
    return False


def run_all(jobs: list[tuple[str, list[str]]], steps: int, parallel: int) -> None:
    """Run the (run_dir, command) pairs not complete yet, `parallel` at a time, each logging to
    <run_dir>.log; a failed run stops the script with its log's tail. A run still alive from an earlier
    invocation is waited for, not started again."""
    todo = [(d, c) for d, c in jobs if not complete(d, steps)]
    for d, _ in jobs:
        if (d, _) not in todo:
            print(f"reusing {os.path.relpath(d, ROOT)}")
    adopted = [d for d, _ in todo if running_elsewhere(d)]
    todo = [(d, c) for d, c in todo if d not in adopted]
    for d in adopted:
        print(f"waiting for the running {os.path.relpath(d, ROOT)}", flush=True)
    running: list[tuple[str, subprocess.Popen, float]] = []
    while todo or running or adopted:
        adopted = [d for d in adopted if running_elsewhere(d)]
        while len(running) < parallel:
            # a command may be a function that returns None until its run can be made (alpha unknown yet)
            ready = [(d, c) for d, c in todo if not callable(c) or c() is not None]
            if not ready:
                break
            run_dir, cmd = ready[0]
            todo.remove(ready[0])
            cmd = cmd() if callable(cmd) else cmd
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                os.remove(os.path.join(run_dir, "metrics.jsonl"))  # an incomplete run starts over
                if os.path.exists(os.path.join(run_dir, "expert_load.jsonl")):
                    os.remove(os.path.join(run_dir, "expert_load.jsonl"))
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            print(" ".join(cmd[1:]), flush=True)
            log = open(run_dir + ".log", "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            running.append((run_dir, proc, time.time()))
        time.sleep(2)
        for item in list(running):
            run_dir, proc, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                with open(run_dir + ".log") as f:
                    tail = f.read()[-3000:]
                raise SystemExit(f"{run_dir} failed (exit {proc.returncode}):\n{tail}")
            print(f"done {os.path.relpath(run_dir, ROOT)} in {time.time() - start:.0f} s", flush=True)


# -- summaries ------------------------------------------------------------------------------------------
def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def final(records: list[dict], key: str) -> float:
    return series(records, key)[-1][1]


def tail_mean(records: list[dict], key: str, n: int) -> float:
    values = [v for _, v in series(records, key)[-n:]]
    return sum(values) / len(values)


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def run_summary(records: list[dict], steps: int) -> dict:
    s = {"val_loss": final(records, "val_loss"), "train_loss_last20": tail_mean(records, "loss", 20),
         "max_vio_batch_last100": tail_mean(records, "max_vio", 100),
         "max_vio_batch_run": tail_mean(records, "max_vio", steps),
         "max_vio_global": final(records, "val_max_vio"), "val_acc": final(records, "val_acc")}
    for key in ("val_mtp1_acc", "val_mtp1_accept", "val_mtp1_loss"):
        if series(records, key):
            s[key] = final(records, key)
    s["step_time_s_median"] = statistics.median(r["step_time_s"] for r in records)
    return s


SPIKE = 5.0  # a gradient norm this many times the run's median so far is a spike


def first_spike(records: list[dict]) -> int:
    """The index of the first step whose gradient norm is SPIKE x the median of the steps before it (at
    least 5 of them); len(records) if none."""
    norms = [r["grad_norm"] for r in records]
    for i in range(5, len(norms)):
        if norms[i] > SPIKE * statistics.median(norms[:i]):
            return i
    return len(norms)


def relative_error(ref: list[dict], other: list[dict], window: int) -> dict:
    """|L_other - L_ref| / L_ref of the per-step training loss (same seed: same data, same init), raw and
    of the `window`-step moving averages; over the whole run, its last quarter, and the steps before the
    first loss spike of either run (a spike's size and timing decide where a run goes next, so after one
    the two runs' losses differ by which spike each had, not by their arithmetic)."""
    a, b = [r["loss"] for r in ref], [r["loss"] for r in other]
    raw = [abs(y - x) / x for x, y in zip(a, b)]
    sa, sb = smooth(a, window), smooth(b, window)
    sm = [abs(y - x) / x for x, y in zip(sa, sb)]
    q = len(raw) * 3 // 4
    spike = min(first_spike(ref), first_spike(other))
    return {"per_step_mean": statistics.fmean(raw), "per_step_mean_last_quarter": statistics.fmean(raw[q:]),
            "smoothed_mean": statistics.fmean(sm), "smoothed_max_last_quarter": max(sm[q:]),
            "smoothed_signed_last": (sb[-1] - sa[-1]) / sa[-1],
            "val_signed": (final(other, "val_loss") - final(ref, "val_loss")) / final(ref, "val_loss"),
            "steps_before_first_spike": spike, "per_step_mean_before_first_spike": statistics.fmean(raw[:spike]),
            "per_step_max_before_first_spike": max(raw[:spike])}


def pick_alpha(runs: dict, seed: int) -> tuple[float, dict]:
    """The largest alpha of the sweep whose held-out loss is within ALPHA_TOLERANCE of no_balance's."""
    ref = final(runs["no_balance"][seed], "val_loss")
    sweep = {a: {"val_loss": final(runs[alpha_name(a)][seed], "val_loss"),
                 "max_vio_global": final(runs[alpha_name(a)][seed], "val_max_vio"),
                 "max_vio_batch_last100": tail_mean(runs[alpha_name(a)][seed], "max_vio", 100)} for a in ALPHAS}
    ok = [a for a in ALPHAS if sweep[a]["val_loss"] <= ref * (1 + ALPHA_TOLERANCE)]
    return (max(ok) if ok else min(ALPHAS)), {"no_balance_val_loss": ref, "tolerance": ALPHA_TOLERANCE,
                                              "sweep": {f"{a:g}": v for a, v in sweep.items()}}


CLAIMS = {"balance": BALANCE, "mtp": ("v3", "no_mtp"), "precision": ("v3", *PRECISION),
          "layer_lr": ("v3", "layer_lr")}


def report(runs: dict, seeds: dict[str, list[int]], steps: int, alpha: float, selection: dict) -> dict:
    """`seeds`: per claim, the seeds on which all its contenders completed."""
    every = sorted({s for v in seeds.values() for s in v})
    per = {name: {s: run_summary(runs[name][s], steps) for s in every if len(runs[name].get(s, [])) == steps}
           for name in CONTENDERS}
    agg = {name: {k: mean_sd([v[k] for v in d.values()]) for k in next(iter(d.values()))} | {"seeds": list(d)}
           for name, d in per.items() if d}

    def paired(a: str, b: str, claim: str, key: str = "val_loss") -> dict:
        """b - a per seed (same data and init), relative to a."""
        return mean_sd([(per[b][s][key] - per[a][s][key]) / per[a][s][key] for s in seeds[claim]])

    ps = seeds["precision"]
    precision = {pair: {s: relative_error(runs[pair[0]][s], runs[pair[1]][s], 20) for s in ps}
                 for pair in (("bf16", "fp8"), ("v3", "bf16"), ("v3", "fp8"), ("v3", "fp32_mb8"))}
    # the noise floor: the same contender, different seeds (different data order and initialization)
    noise = [relative_error(runs["bf16"][a], runs["bf16"][b], 20) for i, a in enumerate(ps) for b in ps[i + 1:]]
    precision_agg = {f"{a}->{b}": {k: mean_sd([v[s][k] for s in ps]) for k in v[ps[0]]}
                     for (a, b), v in precision.items()} if ps else {}
    if noise:
        precision_agg["bf16 seed vs seed (noise floor)"] = {k: mean_sd([n[k] for n in noise]) for k in noise[0]}
    return {
        "steps": steps, "seeds": seeds, "tokens_per_step": 16 * 64, "alpha": alpha, "alpha_selection": selection,
        "per_run": {n: {str(s): v for s, v in d.items()} for n, d in per.items()}, "mean_over_seeds": agg,
        "paired_val_loss_vs_v3": {n: paired("v3", n, c) for c, names in CLAIMS.items() for n in names
                                  if n != "v3" and seeds[c]},
        "paired_val_loss_aux_vs_loss_free": paired("aux_loss", "loss_free", "balance") if seeds["balance"] else None,
        "precision": precision_agg,
    }


# -- pictures -------------------------------------------------------------------------------------------
COLORS = {"v3": "tab:blue", "loss_free": "tab:green", "loss_free_fast": "tab:olive", "aux_loss": "tab:orange",
          "no_balance": "tab:red", "no_mtp": "tab:purple", "bf16": "tab:orange", "fp8": "tab:green",
          "layer_lr": "tab:brown", "fp32_mb8": "black"}


def mean_curve(runs: dict, name: str, seeds: list[int], key: str) -> tuple[list[int], list[float]]:
    curves = [series(runs[name][s], key) for s in seeds]
    steps = [x for x, _ in curves[0]]
    return steps, [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]


def plots(runs: dict, rep: dict, seeds: dict[str, list[int]], first: int, out_dir: str) -> list[str]:
    """`seeds`: per claim, the seeds to average; `first`: the seed of the alpha sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    label = {"v3": "V3 (bias + α=1e-4 seq. loss)", "loss_free": "bias only (loss-free)",
             "loss_free_fast": "bias only, γ=1e-2",
             "aux_loss": f"aux loss only (α={rep['alpha']:g})", "no_balance": "neither"}

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in BALANCE:
        steps, vio = mean_curve(runs, name, seeds["balance"], "max_vio")
        axes[0].plot(steps, smooth(vio, 10), color=COLORS[name], label=label[name])
        steps, g = mean_curve(runs, name, seeds["balance"], "val_max_vio")
        axes[1].plot(steps, g, "o-", color=COLORS[name], label=label[name])
        steps, v = mean_curve(runs, name, seeds["balance"], "val_loss")
        _, ref = mean_curve(runs, "no_balance", seeds["balance"], "val_loss")
        axes[2].plot(steps, [100 * (a - b) / b for a, b in zip(v, ref)], "o-", color=COLORS[name], label=label[name])
    axes[0].set_title("MaxVio_batch (training batches, 10-step mean)")
    axes[1].set_title("MaxVio_global (held-out slice)")
    axes[2].set_title("held-out loss vs 'neither', % (seed means)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"load balancing, moe_tiny, mean of {len(seeds['balance'])} seeds")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ablation_balance.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sel = rep["alpha_selection"]
    pts = [(float(a), v["max_vio_global"], v["val_loss"]) for a, v in sel["sweep"].items()]
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "s-", color="tab:orange", label="aux loss only, α sweep")
    for a, x, y in pts:
        ax.annotate(f"α={a:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    s0 = str(first)
    for name in ("v3", "loss_free", "loss_free_fast", "no_balance"):
        r = rep["per_run"][name][s0]
        ax.plot(r["max_vio_global"], r["val_loss"], "o", color=COLORS[name], ms=8, label=label[name])
    ax.set_xlabel("MaxVio_global at the end (lower = more balanced)")
    ax.set_ylabel("held-out loss at the end")
    ax.set_title(f"balance vs loss, seed {first}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ablation_alpha.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, lab in (("v3", "with MTP (λ=0.3)"), ("no_mtp", "without MTP")):
        steps, v = mean_curve(runs, name, seeds["mtp"], "val_loss")
        axes[0].plot([s * rep["tokens_per_step"] / 1e3 for s in steps], v, "o-", color=COLORS[name], label=lab)
    axes[0].set_xlabel("training tokens (thousands; equal steps = equal tokens)")
    axes[0].set_title("main model's held-out loss")
    axes[0].set_ylim(None, min(axes[0].get_ylim()[1], 5.0))
    for key, lab, style in (("val_mtp1_acc", "MTP: token t+2 (ground truth)", "o-"),
                            ("val_mtp1_accept", "MTP guess = main model's guess", "s--"),
                            ("val_acc", "main model: token t+1", "^:")):
        steps, v = mean_curve(runs, "v3", seeds["mtp"], key)
        axes[1].plot(steps, v, style, label=lab)
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out top-1 accuracy (with-MTP run)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ablation_mtp.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (a, b), color in ((("bf16", "fp8"), "tab:green"), (("v3", "bf16"), "tab:orange"), (("v3", "fp8"), "gray"),
                          (("v3", "fp32_mb8"), "black")):
        for i, s in enumerate(seeds["precision"]):
            la, lb = smooth([r["loss"] for r in runs[a][s]], 20), smooth([r["loss"] for r in runs[b][s]], 20)
            lab = ("fp32 2x8 vs 1x16 (rounding only)" if b == "fp32_mb8" else
                   f"{b} vs {'fp32' if a == 'v3' else a}")
            ax.plot(range(1, len(la) + 1), [100 * (y - x) / x for x, y in zip(la, lb)], color=color, lw=0.9,
                    alpha=0.8, ls=":" if b == "fp32_mb8" else "-", label=lab if i == 0 else None)
    for y in (0.25, -0.25):
        ax.axhline(y, color="red", ls=":", lw=0.8, label="±0.25%" if y > 0 else None)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("relative training-loss difference, % (20-step means)")
    ax.set_title(f"precision, same seed and data ({len(seeds['precision'])} seeds, one line each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ablation_precision.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, lab in (("v3", "one learning rate (V3)"), ("layer_lr", f"layer_lr_decay={LAYER_LR_DECAY}")):
        steps, v = mean_curve(runs, name, seeds["layer_lr"], "val_loss")
        ax.plot(steps, v, "o-", color=COLORS[name], label=lab)
    ax.set_ylim(None, min(ax.get_ylim()[1], 5.0))
    ax.set_xlabel("step")
    ax.set_title("held-out loss, layer-wise learning rates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ablation_layer_lr.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--precision-seeds", type=int, nargs="+", default=[1, 2, 3],
                    help="the seeds of the bf16 and fp8 runs (3-4x the fp32 step time on a CPU)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--skip-train", action="store_true", help="report on the runs that exist")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "ablations"), help="where the runs live")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "ablations.json"))
    ap.add_argument("--img", default=os.path.join(ROOT, "docs", "img"))
    args = ap.parse_args()
    global RUNS
    RUNS = args.runs
    steps, seeds, first = args.steps, args.seeds, args.seeds[0]
    start = time.time()

    # every run, in one queue: the alpha sweep and its reference first (the other seeds' aux_loss runs wait for
    # its pick), then the fp32 runs seed by seed, then the bf16/fp8 runs (3-4x the fp32 step time on a CPU), so
    # that an invocation cut short leaves whole claims on whole seeds
    sweep = {alpha_name(a): [NO_BIAS, f"train.balance_loss_alpha={a}"] for a in ALPHAS}
    names = [*CONTENDERS, *sweep]
    runs: dict[str, dict[int, list[dict]]] = {n: {} for n in names}
    picked: dict[str, float] = {}

    def load(n: str, s: int) -> list[dict]:
        return read_metrics(os.path.join(RUNS, n, f"seed{s}"))

    def pick() -> float | None:
        if "alpha" not in picked:
            if not all(complete(os.path.join(RUNS, n, f"seed{first}"), steps) for n in [*sweep, "no_balance"]):
                return None
            sweep_runs = {n: {first: load(n, first)} for n in [*sweep, "no_balance"]}
            picked["alpha"], picked["selection"] = pick_alpha(sweep_runs, first)
            print(f"alpha picked: {picked['alpha']:g} ({json.dumps(picked['selection'])})", flush=True)
        return picked["alpha"]

    def aux_command(s: int):
        def make():
            alpha = pick()
            return None if alpha is None else command("aux_loss", [NO_BIAS, f"train.balance_loss_alpha={alpha}"],
                                                      steps, s)[1]
        return make

    queue = [command("no_balance", CONTENDERS["no_balance"], steps, first)]
    queue += [command(n, o, steps, first) for n, o in sweep.items()]
    for s in seeds:
        queue += [command(n, CONTENDERS[n], steps, s) for n in CONTENDERS
                  if n not in PRECISION and n != "aux_loss" and (n, s) != ("no_balance", first)]
        if s != first:
            queue.append((os.path.join(RUNS, "aux_loss", f"seed{s}"), aux_command(s)))
    queue += [command(n, CONTENDERS[n], steps, s) for s in args.precision_seeds for n in PRECISION]
    if not args.skip_train:
        run_all(queue, steps, args.jobs)
    alpha = pick()
    if alpha is None:
        raise SystemExit("the alpha sweep is incomplete: no report")
    selection = picked["selection"]
    CONTENDERS["aux_loss"] = [NO_BIAS, f"train.balance_loss_alpha={alpha}"]
    for n in names:
        for s in seeds:
            runs[n][s] = load(n, s)
    runs["aux_loss"][first] = runs[alpha_name(alpha)][first]  # the sweep's run at the picked alpha
    done = {claim: [s for s in seeds if all(len(runs[n][s]) == steps for n in names)]
            for claim, names in CLAIMS.items()}
    if not any(done.values()):
        raise SystemExit("no claim has all its contenders complete on any seed: no report")
    print(f"seeds complete per claim: {done}", flush=True)
    seeds = done
    rep = report(runs, seeds, steps, alpha, selection)
    rep["wall_clock_s"] = round(time.time() - start)
    rep["commands"] = {n: " ".join(["python launch/pretrain.py", *base_overrides(steps, "<seed>"), *o])
                       for n, o in {**CONTENDERS, **sweep}.items()}
    with open(args.json, "w") as f:
        json.dump(rep, f, indent=1)
    for path in plots(runs, rep, seeds, first, args.img):
        print("wrote", os.path.relpath(path, ROOT))
    print("wrote", os.path.relpath(args.json, ROOT))
    print_tables(rep)


def fmt(d: dict, scale: float = 1.0, digits: int = 4) -> str:
    return f"{d['mean'] * scale:.{digits}f} ± {d['sd'] * scale:.{digits}f}"


def print_tables(rep: dict) -> None:
    agg = rep["mean_over_seeds"]
    print("\n| contender | seeds | held-out loss | train loss (last 20) | MaxVio_batch (last 100) | "
          "MaxVio_batch (run) | MaxVio_global (end) | Δ held-out vs v3 (paired) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for n in agg:
        d = rep["paired_val_loss_vs_v3"].get(n)
        print(f"| {n} | {','.join(map(str, agg[n]['seeds']))} | {fmt(agg[n]['val_loss'])} | "
              f"{fmt(agg[n]['train_loss_last20'])} | "
              f"{fmt(agg[n]['max_vio_batch_last100'], digits=3)} | {fmt(agg[n]['max_vio_batch_run'], digits=3)} | "
              f"{fmt(agg[n]['max_vio_global'], digits=3)} | {fmt(d, 100, 2) + ' %' if d else ''} |")
    print("\nMTP (v3):", {k: fmt(agg["v3"][k]) for k in ("val_acc", "val_mtp1_acc", "val_mtp1_accept")})
    print("\nprecision (relative training-loss error, %):")
    for pair, v in rep["precision"].items():
        print(f"  {pair}: " + ", ".join(f"{k} {fmt(x, 1, 1)}" if k.startswith("steps") else f"{k} {fmt(x, 100, 3)} %"
                                        for k, x in v.items()))


if __name__ == "__main__":
    main()
