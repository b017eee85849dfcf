"""The R1 evidence (docs/r1.md): held-out accuracy of GRPO runs over their steps against the start model and
against controls given the same CPU budget, the MoE switches compared, and the distilled dense student
against the same student trained on the gold answers alone.

    python benchmarks/r1_evidence.py --grpo grpo_s0=runs/ev/grpo_s0 --grpo grpo_s1=... \
        --eval sft_control_gold=runs/ev/eval_sft_gold --eval distill=runs/ev/eval_distill ... \
        --json docs/r1_evidence.json --plot docs/img/r1_evidence.png

`--grpo NAME=DIR`: a launch/grpo.py run (its metrics.jsonl: the held-out `eval/*` every train.val_every
steps, before the first and after the last, and the training metrics of every step). `--eval NAME=DIR`: a
launch/evaluate.py run (its eval.json), on the same held-out problems with the same sampling seed. A
`time.txt` in a run directory (`/usr/bin/time -f "%e %U %S"`: wall, user and system seconds of the run)
is reported as its wall and CPU time. Prints the tables of docs/r1.md; writes the JSON and the picture.

Held-out accuracy over CPU seconds (`--cpu-plot`): `--series NAME=EVAL_DIR,EVAL_DIR,...` are evaluations of
checkpoints of one training run (a control); each point is charged the CPU its run had spent up to that
checkpoint, plus `--cost NAME=TIME_FILE` (CPU spent before the run, e.g. sampling its data). The CPU up to
a step is the run's CPU (time.txt) scaled by the wall time its metrics.jsonl records at that step: exact
for a run alone on its core, an estimate where runs shared one.
"""
import argparse
import json
import os


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def read_time_file(path: str) -> dict:
    """`/usr/bin/time -f "%e %U %S"`'s output: wall and CPU (user + system) seconds; {} while the run has
    not ended (time writes when it does)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        fields = f.read().split()
    if len(fields) < 3:
        return {}
    wall, user, system = (float(x) for x in fields[-3:])
    return {"wall_s": wall, "cpu_s": user + system}


def run_time(run_dir: str) -> dict:
    return read_time_file(os.path.join(run_dir, "time.txt"))


def grpo_summary(run_dir: str, window: int) -> dict:
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    steps = [m for m in metrics if "reward" in m]
    evals = [m for m in metrics if "eval/pass@1" in m]
    k = max(int(key.split("@")[1]) for key in evals[0] if key.startswith("eval/pass@") and key.count("/") == 1)
    curve = [{"step": m["step"], "pass@1": m["eval/pass@1"], "stderr": m.get("eval/stderr/pass@1"),
              f"pass@{k}": m[f"eval/pass@{k}"], "format": m.get("eval/format")} for m in evals]
    out = {"kind": "grpo", "k": k, "steps": len(steps), "curve": curve, "start": curve[0], "end": curve[-1],
           **run_time(run_dir)}
    first, last = steps[:window], steps[-window:]
    for key in ("reward", "accuracy", "reward/format", "entropy", "completion_length", "max_vio",
                "logprob_diff/mean_abs", "logprob_diff/max_abs", "frac_zero_std", "routing_drift/tokens"):
        if any(key in m for m in steps):
            out[f"{key}/first_{window}"] = mean([m[key] for m in first if key in m])
            out[f"{key}/last_{window}"] = mean([m[key] for m in last if key in m])
    out["logprob_diff/max_abs/run"] = max((m.get("logprob_diff/max_abs", 0.0) for m in steps), default=0.0)
    out["step_time_s"] = mean([m["step_time_s"] for m in steps if "step_time_s" in m])
    return out


def eval_summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "eval.json")) as f:
        e = json.load(f)
    k = e["samples"]
    return {"kind": "eval", "k": k, "end": {"pass@1": e["pass@1"], "stderr": e["stderr/pass@1"],
                                            f"pass@{k}": e[f"pass@{k}"], "format": e["format"]},
            "problems": e["problems"], "checkpoint": e.get("checkpoint"), **run_time(run_dir)}


def cpu_clock(run_dir: str):
    """step -> CPU seconds the run had spent by the end of that step (its metrics' wall clock, scaled to
    its total CPU); the run's files are read once."""
    rows = [m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "time" in m]
    total = run_time(run_dir).get("cpu_s")
    if total is None:
        raise SystemExit(f"{run_dir}: no complete time.txt, so no CPU time to charge")
    end = max(m["time"] for m in rows)
    return lambda step: total * max((m["time"] for m in rows if m["step"] <= step), default=0.0) / end


def time_file_cpu(path: str) -> float:
    cpu = read_time_file(path).get("cpu_s")
    if cpu is None:
        raise SystemExit(f"{path}: not a complete /usr/bin/time file")
    return cpu


def series_summary(eval_dirs: list[str], extra_cpu: float) -> dict:
    """A control's evaluated checkpoints, each with the CPU spent to reach it."""
    points, clocks, k = [], {}, None
    for d in eval_dirs:
        e = eval_summary(d)
        k = e["k"]
        ckpt = e["checkpoint"].rstrip("/")
        step = int(os.path.basename(ckpt).split("_")[-1])
        run_dir = os.path.dirname(os.path.dirname(ckpt))
        if run_dir not in clocks:
            clocks[run_dir] = cpu_clock(run_dir)
        clock = clocks[run_dir]
        points.append({"step": step, "cpu_s": clock(step) + extra_cpu, "eval": d, **e["end"]})
    points.sort(key=lambda p: p["cpu_s"])
    return {"kind": "series", "k": k, "extra_cpu_s": extra_cpu, "points": points}


def grpo_cpu_curve(run_dir: str, curve: list[dict]) -> list[dict]:
    clock = cpu_clock(run_dir)
    return [{**c, "cpu_s": clock(c["step"])} for c in curve]


def plot_cpu(summary: dict, grpo_dirs: dict[str, str], series: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in grpo_dirs:
        c = summary[name]["cpu_curve"]
        ax.errorbar([p["cpu_s"] for p in c], [p["pass@1"] for p in c], yerr=[p["stderr"] or 0 for p in c],
                    marker="o", capsize=3, label=f"GRPO: {name}")
    for name in series:
        pts = summary[name]["points"]
        ax.errorbar([p["cpu_s"] for p in pts], [p["pass@1"] for p in pts], yerr=[p["stderr"] for p in pts],
                    marker="s", ls="--", capsize=3, label=name)
    ax.set(xlabel="CPU seconds from the start model (one thread)", ylabel="held-out pass@1 (± standard error)",
           title="held-out accuracy per CPU second: GRPO and the controls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def smooth(xs: list[float], window: int) -> list[float]:
    return [mean(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def plot(grpo_dirs: dict[str, str], summary: dict, window: int, path: str, lines: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    # Runs named GROUP_sN are seeds of one setting: one colour per setting, one line style per seed.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(name.rsplit("_s", 1)[0] for name in grpo_dirs))
    styles, seen = ["-", "--", ":", "-."], {}
    for name, run_dir in grpo_dirs.items():
        s, group = summary[name], name.rsplit("_s", 1)[0]
        color, style = palette[groups.index(group) % len(palette)], styles[seen.get(group, 0) % len(styles)]
        seen[group] = seen.get(group, 0) + 1
        xs = [c["step"] for c in s["curve"]]
        a.errorbar(xs, [c["pass@1"] for c in s["curve"]], yerr=[c["stderr"] or 0 for c in s["curve"]], marker="o",
                   capsize=3, label=name, color=color, ls=style)
        steps = [m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "reward" in m]
        b.plot([m["step"] for m in steps], smooth([m["accuracy"] for m in steps], window), label=name, color=color,
               ls=style)
    colors = iter(palette[len(groups):])
    for name in lines:
        end, c = summary[name]["end"], next(colors, "gray")
        a.axhline(end["pass@1"], ls="--", color=c, label=name)
        a.axhspan(end["pass@1"] - end["stderr"], end["pass@1"] + end["stderr"], color=c, alpha=0.12)
    a.set(xlabel="GRPO step", ylabel="held-out pass@1 (± standard error)", title="held-out problems")
    b.set(xlabel="GRPO step", ylabel=f"accuracy of the sampled groups (mean of {window} steps)",
          title="training prompts (same distribution, disjoint)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpo", action="append", default=[], help="NAME=RUN_DIR of a launch/grpo.py run")
    parser.add_argument("--eval", action="append", default=[], help="NAME=RUN_DIR of a launch/evaluate.py run")
    parser.add_argument("--line", action="append", default=[],
                        help="an --eval NAME drawn as a level line over the GRPO curves (a control)")
    parser.add_argument("--series", action="append", default=[],
                        help="NAME=EVAL_DIR,EVAL_DIR,...: evaluated checkpoints of one control run, over its CPU")
    parser.add_argument("--cost", action="append", default=[],
                        help="NAME=TIME_FILE: CPU a --series spent before its run (its data's sampling)")
    parser.add_argument("--cpu-plot", default=None, help="held-out pass@1 over CPU seconds")
    parser.add_argument("--plot-run", action="append", default=[],
                        help="a --grpo NAME drawn in --plot (default: all)")
    parser.add_argument("--cpu-run", action="append", default=[],
                        help="a --grpo NAME drawn in --cpu-plot (default: all; each needs a complete time.txt)")
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    grpo_dirs = dict(item.split("=", 1) for item in args.grpo)
    eval_dirs = dict(item.split("=", 1) for item in args.eval)
    summary = {name: grpo_summary(d, args.window) for name, d in grpo_dirs.items()}
    summary.update({name: eval_summary(d) for name, d in eval_dirs.items()})
    costs = {name: time_file_cpu(path) for name, path in (item.split("=", 1) for item in args.cost)}
    series = {name: dirs.split(",") for name, dirs in (item.split("=", 1) for item in args.series)}
    cpu_runs = {name: d for name, d in grpo_dirs.items() if name in args.cpu_run} if args.cpu_run else grpo_dirs
    if args.cpu_plot:
        for name, d in cpu_runs.items():
            summary[name]["cpu_curve"] = grpo_cpu_curve(d, summary[name]["curve"])
    for name, dirs in series.items():
        summary[name] = series_summary(dirs, costs.get(name, 0.0))
    print("| run | held-out pass@1 at the start | at the end | pass@k start | pass@k end | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        if s["kind"] == "series":
            continue
        k = s["k"]
        start = s.get("start")
        end = s["end"]
        st = f"{start['pass@1']:.3f} ± {start['stderr']:.3f}" if start else ""
        stk = f"{start[f'pass@{k}']:.3f}" if start else ""
        print(f"| {name} | {st} | {end['pass@1']:.3f} ± {end['stderr']:.3f} | {stk} | {end[f'pass@{k}']:.3f} (k={k}) "
              f"| {s.get('wall_s', float('nan')):.0f} | {s.get('cpu_s', float('nan')):.0f} |")
    w = args.window
    if grpo_dirs:
        print(f"\n| GRPO run | accuracy first {w} | last {w} | MaxVio first {w} | last {w} | "
              f"log-prob diff mean | max | s/step |")
        print("|---|---|---|---|---|---|---|---|")
        for name in grpo_dirs:
            s = summary[name]
            print(f"| {name} | {s[f'accuracy/first_{w}']:.3f} | {s[f'accuracy/last_{w}']:.3f} | "
                  f"{s.get(f'max_vio/first_{w}', float('nan')):.3f} | {s.get(f'max_vio/last_{w}', float('nan')):.3f} | "
                  f"{s.get(f'logprob_diff/mean_abs/last_{w}', float('nan')):.1e} | {s['logprob_diff/max_abs/run']:.1e} | "
                  f"{s['step_time_s']:.1f} |")
    if series:
        print("\n| control | step | CPU s | held-out pass@1 | pass@k |")
        print("|---|---|---|---|---|")
        for name in series:
            k = summary[name]["k"]
            for p in summary[name]["points"]:
                print(f"| {name} | {p['step']} | {p['cpu_s']:.0f} | {p['pass@1']:.3f} ± {p['stderr']:.3f} | "
                      f"{p[f'pass@{k}']:.3f} |")
    if args.cpu_plot:
        print("\n| GRPO run | step | CPU s | held-out pass@1 |")
        print("|---|---|---|---|")
        for name in cpu_runs:
            for p in summary[name]["cpu_curve"]:
                print(f"| {name} | {p['step']} | {p['cpu_s']:.0f} | {p['pass@1']:.3f} ± {p['stderr']:.3f} |")
        plot_cpu(summary, cpu_runs, list(series), args.cpu_plot)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"window": w, "runs": summary}, f, indent=1)
    if args.plot and grpo_dirs:
        shown = {name: d for name, d in grpo_dirs.items() if name in args.plot_run} if args.plot_run else grpo_dirs
        plot(shown, summary, w, args.plot, args.line)


if __name__ == "__main__":
    main()
