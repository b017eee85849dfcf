"""FP8 vs fp32 training of `moe_small` on this machine: loss curves, relative loss error, and the
activation memory backward keeps per token.

    python benchmarks/fp8_convergence.py [--steps 150] [--skip-train] [--json docs/fp8_convergence.json]
                                         [--plot docs/img/fp8_loss.png]

Training: the real entry point (`launch/pretrain.py +experiment=moe_small`) twice, same seed, data and
schedule (the cosine decay shortened to end at --steps): `precision=fp32` and `precision=fp8` (the
preset: FP8 GEMMs, emulated on CPU, and BF16 AdamW moments). Runs live in runs/fp8_convergence/ and
are reused when complete (--skip-train only reports). The relative loss error is
|L_fp8 - L_fp32| / L_fp32 of the per-step training loss, averaged over the last --tail steps, and of
the held-out loss at the end.

Memory: one forward of the moe_small model at two batch sizes inside `SavedTensorLedger`; the
difference divided by the token difference is the bytes per token backward keeps (weights, and the
FP8 weight copies, are per step, not per token, and drop out). Variants: fp32; bf16 (the model cast
to BF16: BF16 activations, the norms' and the gate's fp32 internals as the code has them); fp8 (fp32
elsewhere, as it runs on CPU); fp8+bf16 (FP8 GEMMs in a BF16 model, the GPU configuration).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsv3.config.schema import Fp8Config, ModelConfig  # noqa: E402
from dsv3.fp8 import convert_to_fp8  # noqa: E402
from dsv3.fp8.memory import SavedTensorLedger  # noqa: E402
from dsv3.model import Transformer, init_weights  # noqa: E402

PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")
RUNS = os.path.join(ROOT, "runs", "fp8_convergence")
PRECISIONS = ("fp32", "fp8")
# --ablation: fp32 GEMMs with the preset's BF16 AdamW moments, to tell the two changes of the fp8 run apart.
ABLATION = ("fp32_bf16_moments", ["precision=fp32", "optim.moment_dtype=bf16"])
WARMUP = 20  # moe_small's warmup_steps


# -- training -------------------------------------------------------------------------------------------
def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(name: str, overrides: list[str], steps: int, threads: int) -> str:
    run_dir = os.path.join(RUNS, name)
    if len(read_metrics(run_dir)) == steps:
        print(f"{name}: reusing the complete run in {run_dir}")
        return run_dir
    cmd = [sys.executable, PRETRAIN, "+experiment=moe_small", *overrides, f"hydra.run.dir={run_dir}",
           f"train.max_steps={steps}", f"optim.decay_steps={steps - WARMUP}", "train.resume=none",
           "train.log_every=1", "train.val_every=50", "checkpoint.every=0", f"train.threads={threads}"]
    print(" ".join(cmd), flush=True)
    start = time.time()
    with open(os.path.join(RUNS, f"{name}.log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    print(f"{name}: {steps} steps in {time.time() - start:.0f} s", flush=True)
    return run_dir


def compare(ref: list[dict], other: list[dict], tail: int) -> dict:
    """Relative loss error of `other` against `ref` (the fp32 run)."""
    assert [m["step"] for m in ref] == [m["step"] for m in other], "the runs logged different steps"
    rel = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(ref, other)]
    mean_a, mean_b = (sum(m["loss"] for m in run[-tail:]) / tail for run in (ref, other))
    val_a, val_b = ([m["val_loss"] for m in run if "val_loss" in m][-1] for run in (ref, other))
    return {"mean_rel_loss_error_tail": sum(rel[-tail:]) / tail, "max_rel_loss_error_tail": max(rel[-tail:]),
            "rel_error_of_tail_mean_loss": (mean_b - mean_a) / mean_a, "tail_mean_loss": mean_b,
            "final_val_loss": val_b, "rel_val_loss_error": (val_b - val_a) / val_a}


def loss_report(runs: dict[str, list[dict]], tail: int) -> dict:
    ref, fp8 = runs["fp32"], runs["fp8"]
    vs = compare(ref, fp8, tail)
    mean_a = sum(m["loss"] for m in ref[-tail:]) / tail
    vals = {p: [(m["step"], m["val_loss"]) for m in run if "val_loss" in m] for p, run in runs.items()}
    report = {
        "steps": len(ref), "tail": tail,
        "mean_rel_loss_error_tail": vs["mean_rel_loss_error_tail"],
        "max_rel_loss_error_tail": vs["max_rel_loss_error_tail"],
        "rel_error_of_tail_mean_loss": vs["rel_error_of_tail_mean_loss"],
        "tail_mean_loss": {"fp32": mean_a, "fp8": vs["tail_mean_loss"]},
        "val_loss": vals, "final_val_loss": {p: vals[p][-1][1] for p in runs},
        "rel_val_loss_error": vs["rel_val_loss_error"],
        "first_loss": {p: run[0]["loss"] for p, run in runs.items()},
        "step_time_s_median": {p: sorted(m["step_time_s"] for m in run)[len(run) // 2] for p, run in runs.items()},
    }
    if ABLATION[0] in runs:
        report["ablation_vs_fp32"] = {ABLATION[0]: compare(ref, runs[ABLATION[0]], tail)}
    return report


def plot(runs: dict[str, list[dict]], report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for p, style in zip(PRECISIONS, ("-", "--")):
        steps = [m["step"] for m in runs[p]]
        top.plot(steps, [m["loss"] for m in runs[p]], style, lw=1.2, label=f"{p} train loss")
        val = report["val_loss"][p]
        top.plot([s for s, _ in val], [v for _, v in val], "o" + style, ms=5, label=f"{p} held-out loss")
    top.set_ylabel("next-token loss")
    top.set_title(f"moe_small on the embedded corpus, {report['steps']} steps: fp32 vs FP8 recipe (emulated)")
    top.legend()
    top.grid(alpha=0.3)
    ref = runs["fp32"]
    steps = [m["step"] for m in ref]
    for name, color in (("fp8", "gray"), (ABLATION[0], "tab:blue")):
        if name in runs:
            diff = [100 * (b["loss"] - a["loss"]) / a["loss"] for a, b in zip(ref, runs[name])]
            bottom.plot(steps, diff, lw=0.8, color=color, label=name, alpha=1.0 if name == "fp8" else 0.6)
    bottom.axhline(0, color="black", lw=0.6)
    for y in (0.25, -0.25):  # DeepSeek-V3's FP8 validation: relative loss error below 0.25%
        bottom.axhline(y, color="red", lw=0.6, ls=":", label="±0.25%" if y > 0 else None)
    bottom.legend(fontsize=8, loc="upper right", ncol=3)
    bottom.set_ylabel("(run - fp32) / fp32, %")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


# -- memory ---------------------------------------------------------------------------------------------
# Module kinds (class names) of the tensors the recipe caches in FP8, and how the report groups them.
def category(module: str, kind: str) -> str:
    if kind in ("Experts", "Fp8Experts"):
        return "routed experts"
    if ".shared_experts" in module:
        return "shared experts"
    if module.endswith("eh_proj"):
        return "MTP projection"
    if kind in ("Linear", "Fp8Linear") and ".attn." in module:
        return "MLA projections"
    if kind in ("FeedForward", "Fp8FeedForward") or (kind in ("Linear", "Fp8Linear") and ".ffn." in module):
        return "dense FFN"
    if kind == "MLA":
        return "attention core (SDPA, RoPE)"
    if kind == "RMSNorm":
        return "norms"
    if kind in ("MoE", "Gate"):
        return "router, dispatch, combine"
    return "embedding, head, loss, residual"


FP8_CATEGORIES = ("MLA projections", "dense FFN", "shared experts", "routed experts", "MTP projection")


def saved_bytes(model: Transformer, tokens: torch.Tensor) -> dict[str, int]:
    with SavedTensorLedger(model) as ledger:
        parts = model.losses(tokens, tokens)
    by_cat = ledger.bytes_by(lambda r: category(r.module, r.kind))
    del parts
    return by_cat


def memory_report(cfg: ModelConfig, seq_len: int, batches=(1, 3)) -> dict:
    variants = {"fp32": (False, False), "bf16": (False, True), "fp8": (True, False), "fp8+bf16": (True, True)}
    out = {}
    for name, (fp8, bf16) in variants.items():
        model = Transformer(cfg)
        init_weights(model, seed=1234, std=cfg.init_std)
        if bf16:  # activations in BF16 wherever the model computes in the weights' dtype
            model = model.to(torch.bfloat16)
        if fp8:
            convert_to_fp8(model, Fp8Config(), "reference")
        g = torch.Generator().manual_seed(0)
        tok = {b: torch.randint(0, cfg.vocab_size, (b, seq_len), generator=g) for b in batches}
        small, large = (saved_bytes(model, tok[b]) for b in batches)
        per_token = {c: (large.get(c, 0) - small.get(c, 0)) / ((batches[1] - batches[0]) * seq_len)
                     for c in sorted(set(small) | set(large))}
        per_token["total"] = sum(per_token.values())
        per_token["FP8-cached modules"] = sum(per_token.get(c, 0) for c in FP8_CATEGORIES)
        out[name] = per_token
    return out


def print_tables(report: dict | None, memory: dict | None) -> None:
    if report:
        print(f"\nloss, last {report['tail']} of {report['steps']} steps:")
        print("| | fp32 | fp8 | relative error |")
        print("|---|---:|---:|---:|")
        tm, rel_tail = report["tail_mean_loss"], 100 * report["rel_error_of_tail_mean_loss"]
        print(f"| mean train loss | {tm['fp32']:.4f} | {tm['fp8']:.4f} | {rel_tail:+.3f}% |")
        print(f"| mean per-step abs. rel. error | | | {100 * report['mean_rel_loss_error_tail']:.3f}% |")
        fv, rel_val = report["final_val_loss"], 100 * report["rel_val_loss_error"]
        print(f"| final held-out loss | {fv['fp32']:.4f} | {fv['fp8']:.4f} | {rel_val:+.3f}% |")
        st = report["step_time_s_median"]
        print(f"| median step time (s) | {st['fp32']:.2f} | {st['fp8']:.2f} | |")
        for name, vs in report.get("ablation_vs_fp32", {}).items():
            print(f"{name} vs fp32: mean train loss of the tail {100 * vs['rel_error_of_tail_mean_loss']:+.3f}%, "
                  f"mean per-step abs. rel. error {100 * vs['mean_rel_loss_error_tail']:.3f}%, "
                  f"held-out {100 * vs['rel_val_loss_error']:+.3f}%")
    if memory:
        names = list(memory)
        cats = [c for c in memory["fp32"] if c not in ("total", "FP8-cached modules")]
        print("\nbytes per token kept for backward (slope between two batch sizes):")
        print("| module group | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for c in [*FP8_CATEGORIES, *[c for c in cats if c not in FP8_CATEGORIES], "FP8-cached modules", "total"]:
            if c in memory["fp32"]:
                print(f"| {c} | " + " | ".join(f"{memory[n].get(c, 0):,.0f}" for n in names) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--tail", type=int, default=20, help="steps at the end over which the loss error is averaged")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-train", action="store_true", help="report on existing runs only")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--ablation", action="store_true",
                    help="also train fp32 with BF16 AdamW moments (the fp8 preset's other change)")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "fp8_convergence.json"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "fp8_loss_moe_small.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(RUNS, exist_ok=True)

    report = None
    variants = {p: [f"precision={p}"] for p in PRECISIONS}
    if args.ablation:
        variants[ABLATION[0]] = ABLATION[1]
    if not args.skip_train:
        for name, overrides in variants.items():
            train(name, overrides, args.steps, args.threads)
    runs = {name: read_metrics(os.path.join(RUNS, name)) for name in variants}
    if all(len(runs[p]) == args.steps for p in runs):
        report = loss_report(runs, args.tail)
        plot(runs, report, args.plot)
    else:
        print(f"no loss report: the runs in {RUNS} logged {[len(runs[p]) for p in PRECISIONS]} of {args.steps} steps")
    memory = None
    if not args.skip_memory:
        import yaml

        with open(os.path.join(ROOT, "configs", "model", "moe_small.yaml")) as f:
            cfg = ModelConfig(**yaml.safe_load(f))
        memory = memory_report(cfg, seq_len=256)
    print_tables(report, memory)
    previous = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            previous = json.load(f)
    result = {**previous, "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
                                     f"{args.threads} thread(s) per run"}
    if report:
        result["loss"] = report
    if memory:
        result["saved_bytes_per_token"] = memory
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}" + (f" and {args.plot}" if report else ""))


if __name__ == "__main__":
    main()
