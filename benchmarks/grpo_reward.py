"""Reward over GRPO steps: GRPO runs against a control that samples the same prompts with the same seeds
from a policy that does not move (optim.lr=1e-12), so that what rises is told apart from sampling noise.

    python benchmarks/grpo_reward.py --run grpo_seed0=runs/grpo_arith_tiny_s0 --run grpo_seed1=... \
        --run control=runs/grpo_arith_tiny_control --json docs/grpo_reward.json --plot docs/img/grpo_reward.png

Reads each run's metrics.jsonl (launch/grpo.py writes one line per step with `train.log_every=1`) and
reports per run: the training reward, accuracy and format reward averaged over the first and the last
`--window` steps, and the held-out pass@1 / pass@k the runs measured (`eval/*`, every train.val_every
steps). The picture: the training reward, smoothed over --window steps, per run; held-out pass@1 beside it.
"""
import argparse
import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(metrics: list[dict], window: int) -> dict:
    steps = [m for m in metrics if "reward" in m]
    evals = [m for m in metrics if "eval/pass@1" in m]
    first, last = steps[:window], steps[-window:]
    ks = sorted(k for k in evals[0] if k.startswith("eval/pass@") and k.count("/") == 1) if evals else []
    out = {"steps": len(steps)}
    for key in ("reward", "accuracy", "reward/format", "entropy", "completion_length"):
        out[f"{key}/first_{window}"] = mean([m[key] for m in first])
        out[f"{key}/last_{window}"] = mean([m[key] for m in last])
    out["held_out"] = [{"step": m["step"], **{k: m[k] for k in ks}} for m in evals]
    out["step_time_s"] = mean([m["step_time_s"] for m in steps])
    return out


def smooth(xs: list[float], window: int) -> list[float]:
    return [mean(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def plot(runs: dict[str, list[dict]], window: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, metrics in runs.items():
        steps = [m for m in metrics if "reward" in m]
        style = "--" if name.startswith("control") else "-"
        a.plot([m["step"] for m in steps], smooth([m["reward"] for m in steps], window), style, label=name)
        evals = [m for m in metrics if "eval/pass@1" in m]
        b.plot([m["step"] for m in evals], [m["eval/pass@1"] for m in evals], style + "o", label=name)
    a.set(xlabel="GRPO step", ylabel=f"training reward (mean of last {window} steps)",
          title="reward of the sampled groups")
    b.set(xlabel="GRPO step", ylabel="pass@1", title="held-out problems")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR (several)")
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        name, _, path = item.partition("=")
        runs[name] = read_metrics(path)
    summary = {name: summarize(m, args.window) for name, m in runs.items()}
    w = args.window
    print(f"| run | reward first {w} | reward last {w} | accuracy first {w} | accuracy last {w} | "
          f"format last {w} | held-out pass@1 (steps) |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        held = ", ".join(f"{e['eval/pass@1']:.3f}" for e in s["held_out"])
        print(f"| {name} | {s[f'reward/first_{w}']:.3f} | {s[f'reward/last_{w}']:.3f} | "
              f"{s[f'accuracy/first_{w}']:.3f} | {s[f'accuracy/last_{w}']:.3f} | {s[f'reward/format/last_{w}']:.3f} "
              f"| {held} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"window": w, "runs": summary}, f, indent=1)
    if args.plot:
        plot(runs, w, args.plot)


if __name__ == "__main__":
    main()
