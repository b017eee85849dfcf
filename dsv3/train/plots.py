"""Pictures of runs from what they write: `metrics.jsonl` and `expert_load.jsonl` (see `launch/plot.py`).

    loss.png         training loss (faint: every logged step; solid: its moving average) and held-out loss
                     (markers) of every run, overlaid
    lr.png           learning rate
    grad_norm.png    global gradient norm before clipping (log scale)
    max_vio.png      MaxVio of the training batches (MaxVio_batch, moving average) and of the held-out
                     slice at each evaluation (MaxVio_global, markers)
    expert_load_<run>.png   per run: one panel per MoE layer, experts x steps, colour = the expert's share
                     of the layer's routed tokens over each logging interval, relative to an even share
                     (1 = balanced; log scale)
    profile_<run>.png       per run with a `train.profile_steps` trace (rank 0): the profiled steps as a
                     timeline of forward / backward / optimizer, the allocated memory over the same time
                     axis, and the operators with the most self time
"""
from __future__ import annotations

import glob
import json
import os


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_labels(run_dirs: list[str]) -> list[str]:
    """The shortest path tails that tell the runs apart (`seed1`, `seed2` -> `v3/seed1`, ...)."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(i) for i in range(len(run_dirs))]


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` points (fewer at the ends): no lag on a falling curve."""
    half, out = window // 2, []
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_runs(run_dirs: list[str], out_dir: str, window: int = 20) -> list[str]:
    """Write the PNGs for `run_dirs` into `out_dir`; returns their paths. Runs without metrics are refused."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    metrics = {d: read_jsonl(os.path.join(d, "metrics.jsonl")) for d in run_dirs}
    empty = [d for d, m in metrics.items() if not m]
    if empty:
        raise FileNotFoundError(f"no metrics.jsonl with records in: {', '.join(empty)}")
    labels = dict(zip(run_dirs, run_labels(run_dirs)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def figure(name: str, title: str, draw, ylabel: str, log_y: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drew = False
        for i, d in enumerate(run_dirs):
            drew |= draw(ax, metrics[d], labels[d], colors[i % len(colors)])
        if not drew:
            plt.close(fig)
            return
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    def loss(ax, rec, label, color) -> bool:
        steps, values = _series(rec, "loss")
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.7)
        ax.plot(steps, moving_average(values, window), color=color, lw=1.5, label=f"{label} train")
        vs, vv = _series(rec, "val_loss")
        ax.plot(vs, vv, "o--", color=color, ms=5, lw=0.8, label=f"{label} held-out")
        return bool(steps)

    def simple(key: str):
        def draw(ax, rec, label, color) -> bool:
            steps, values = _series(rec, key)
            ax.plot(steps, values, color=color, lw=1.2, label=label)
            return bool(steps)
        return draw

    def max_vio(ax, rec, label, color) -> bool:
        steps, values = _series(rec, "max_vio")
        ax.plot(steps, values, color=color, alpha=0.2, lw=0.7)
        ax.plot(steps, moving_average(values, window), color=color, lw=1.5, label=f"{label} MaxVio_batch")
        vs, vv = _series(rec, "val_max_vio")
        ax.plot(vs, vv, "s--", color=color, ms=5, lw=0.8, label=f"{label} MaxVio_global (held-out)")
        return bool(steps)

    figure("loss.png", f"loss (moving average over {window} logged steps; markers: held-out)", loss,
           "next-token cross-entropy")
    figure("lr.png", "learning rate", simple("lr"), "lr")
    figure("grad_norm.png", "gradient norm (before clipping)", simple("grad_norm"), "global L2 norm", log_y=True)
    figure("max_vio.png", "expert load imbalance: (max load - mean) / mean, mean over MoE layers", max_vio, "MaxVio")

    for d in run_dirs:
        loads = read_jsonl(os.path.join(d, "expert_load.jsonl"))
        if not loads:
            continue
        n_layers, n_experts = len(loads[0]["load"]), len(loads[0]["load"][0])
        fig, axes = plt.subplots(n_layers, 1, figsize=(9, 1.2 + 1.5 * n_layers), sharex=True, squeeze=False)
        steps = [r["step"] for r in loads]
        edges = [0] + steps  # interval r covers the steps after the previous record up to r["step"]
        norm = LogNorm(vmin=1 / 8, vmax=8)
        for layer, ax in enumerate(axes[:, 0]):
            grid = [[max(r["load"][layer][e] * n_experts, 1e-3) for r in loads] for e in range(n_experts)]
            mesh = ax.pcolormesh(edges, range(n_experts + 1), grid, cmap="RdBu_r", norm=norm, shading="flat")
            ax.set_ylabel(f"MoE layer {layer}\nexpert", fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="share of tokens / even share")
        fig.suptitle(f"{labels[d]}: expert load per MoE layer (MTP modules last)")
        name = "expert_load_" + labels[d].replace("/", "_") + ".png"
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    for d in run_dirs:
        traces = sorted(glob.glob(os.path.join(d, "profile", "rank0.steps*.pt.trace.json")))
        if traces:
            written.append(os.path.join(out_dir, "profile_" + labels[d].replace("/", "_") + ".png"))
            plot_profile(traces[-1], written[-1], f"{labels[d]}: {os.path.basename(traces[-1])}")
    return written


PHASES = {"forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:green", "other": "tab:gray"}


def profile_phases(trace: dict) -> tuple[list[dict], list[tuple[str, float, float]], dict[str, float]]:
    """From a torch.profiler Chrome trace: the `ProfilerStep#n` ranges; the spans (phase, start, end) of
    the operators directly inside a step on its thread, in microseconds, classed by phase (the autograd
    engine's functions are the backward; `Optimizer.*` the optimizer; what follows a step's last backward op,
    e.g. clipping and the bias update, other; the rest, every micro-batch's forward, forward); and each
    operator's self time (its duration less that of the operators it calls), summed over the trace."""
    # the profiler's own range ("PyTorch Profiler (0)", category Trace) spans everything: not an operator
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e and e.get("cat") != "Trace"]
    steps = sorted((e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")), key=lambda e: e["ts"])
    spans: list[tuple[str, float, float]] = []
    self_time: dict[str, float] = {}
    by_thread: dict = {}
    for e in events:
        by_thread.setdefault(e["tid"], []).append(e)
    step_tids = {e["tid"] for e in steps}
    for tid, evs in by_thread.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, time of its children]

        def pop_until(ts: float) -> None:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= ts:
                ev, child = stack.pop()
                self_time[ev["name"]] = self_time.get(ev["name"], 0.0) + ev["dur"] - child

        for e in evs:
            pop_until(e["ts"])
            if stack:
                stack[-1][1] += e["dur"]
            if tid in step_tids and len(stack) == 1 and stack[0][0]["name"].startswith("ProfilerStep#"):
                name = e["name"]
                phase = ("backward" if name.startswith("autograd::engine::evaluate_function") else
                         "optimizer" if name.startswith("Optimizer.") else "forward")
                spans.append((phase, e["ts"], e["ts"] + e["dur"]))
            stack.append([e, 0.0])
        pop_until(float("inf"))
    for step in steps:
        end = step["ts"] + step["dur"]
        last_backward = max((a for p, a, b in spans if p == "backward" and step["ts"] <= a < end), default=end)
        spans = [("other" if p == "forward" and last_backward < a < end else p, a, b) for p, a, b in spans]
    for e in steps:
        self_time.pop(e["name"], None)
    return steps, spans, self_time


def plot_profile(trace_path: str, out_path: str, title: str, top: int = 12) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(trace_path) as f:
        trace = json.load(f)
    steps, spans, self_time = profile_phases(trace)
    if not steps:
        raise ValueError(f"{trace_path}: no ProfilerStep# ranges (not a train.profile_steps trace)")
    t0 = steps[0]["ts"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), gridspec_kw={"height_ratios": [1, 2, 3]})
    ax = axes[0]
    total = {p: 0.0 for p in PHASES}
    for phase, color in PHASES.items():
        bars = [((a - t0) / 1e6, (b - a) / 1e6) for p, a, b in spans if p == phase]
        ax.broken_barh(bars, (0, 1), color=color, lw=0)
        total[phase] = sum(w for _, w in bars) * 1e6
    for e in steps:
        ax.axvline((e["ts"] - t0) / 1e6, color="black", lw=0.8)
        ax.text((e["ts"] - t0) / 1e6, 1.05, e["name"].replace("ProfilerStep", "step "), fontsize=8)
    span = sum(e["dur"] for e in steps)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=f"{p} {100 * total[p] / span:.0f}%")
                       for p, c in PHASES.items()], fontsize=8, ncol=4, loc="upper right", bbox_to_anchor=(1, -0.35))
    ax.set_yticks([])
    ax.set_ylim(0, 1.3)
    ax.set_title(title, fontsize=10)
    ax = axes[1]
    mem = sorted((e["ts"], e["args"]["Total Allocated"]) for e in trace["traceEvents"]
                 if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {}))
    if mem:
        ax.step([(t - t0) / 1e6 for t, _ in mem], [b / 2**20 for _, b in mem], where="post", lw=0.8)
    ax.set_ylabel("allocated during\nthe trace (MiB)")
    ax.set_xlabel("seconds since the first profiled step")
    ax.sharex(axes[0])
    ax.grid(alpha=0.3)
    ax = axes[2]
    best = sorted(self_time.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
    ax.barh([n if len(n) < 60 else n[:57] + "..." for n, _ in best], [100 * t / span for _, t in best])
    ax.set_xlabel(f"self time, % of the {len(steps)} profiled steps")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
