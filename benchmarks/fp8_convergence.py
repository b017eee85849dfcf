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
WARMUP = 20  # moe_small's warmup_steps


# -- training -------------------------------------------------------------------------------------------
def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(precision: str, steps: int, threads: int) -> str:
    run_dir = os.path.join(RUNS, precision)
    if len(read_metrics(run_dir)) == steps:
        print(f"{precision}: reusing the complete run in {run_dir}")
        return run_dir
    cmd = [sys.executable, PRETRAIN, "+experiment=moe_small", f"precision={precision}", f"hydra.run.dir={run_dir}",
           f"train.max_steps={steps}", f"optim.decay_steps={steps - WARMUP}", "train.resume=none",
           "train.log_every=1", "train.val_every=50", "checkpoint.every=0", f"train.threads={threads}"]
    print(" ".join(cmd), flush=True)
    start = time.time()
    with open(os.path.join(RUNS, f"{precision}.log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    print(f"{precision}: {steps} steps in {time.time() - start:.0f} s", flush=True)
    return run_dir


def loss_report(runs: dict[str, list[dict]], tail: int) -> dict:
    ref, fp8 = runs["fp32"], runs["fp8"]
    assert [m["step"] for m in ref] == [m["step"] for m in fp8], "the runs logged different steps"
    rel = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(ref, fp8)]
    last_a, last_b = ref[-tail:], fp8[-tail:]
    mean_a = sum(m["loss"] for m in last_a) / tail
    mean_b = sum(m["loss"] for m in last_b) / tail
    vals = {p: [(m["step"], m["val_loss"]) for m in runs[p] if "val_loss" in m] for p in PRECISIONS}
    final_val = {p: vals[p][-1][1] for p in PRECISIONS}
    return {
        "steps": len(ref), "tail": tail,
        "mean_rel_loss_error_tail": sum(rel[-tail:]) / tail,
        "max_rel_loss_error_tail": max(rel[-tail:]),
        "rel_error_of_tail_mean_loss": (mean_b - mean_a) / mean_a,
        "tail_mean_loss": {"fp32": mean_a, "fp8": mean_b},
        "val_loss": vals, "final_val_loss": final_val,
        "rel_val_loss_error": (final_val["fp8"] - final_val["fp32"]) / final_val["fp32"],
        "first_loss": {p: runs[p][0]["loss"] for p in PRECISIONS},
        "step_time_s_median": {p: sorted(m["step_time_s"] for m in runs[p])[len(runs[p]) // 2] for p in PRECISIONS},
    }


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
    ref, fp8 = runs["fp32"], runs["fp8"]
    bottom.plot([m["step"] for m in ref], [100 * (b["loss"] - a["loss"]) / a["loss"] for a, b in zip(ref, fp8)],
                lw=0.8, color="gray")
    bottom.axhline(0, color="black", lw=0.6)
    for y in (0.25, -0.25):
        bottom.axhline(y, color="red", lw=0.6, ls=":")
    bottom.set_ylabel("(fp8 - fp32) / fp32, %")
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
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "fp8_convergence.json"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "fp8_loss_moe_small.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(RUNS, exist_ok=True)

    report = None
    if not args.skip_train:
        for p in PRECISIONS:
            train(p, args.steps, args.threads)
    runs = {p: read_metrics(os.path.join(RUNS, p)) for p in PRECISIONS}
    if all(len(runs[p]) == args.steps for p in PRECISIONS):
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
