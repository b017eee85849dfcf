"""train.compile: compilation time and step time against eager, same model, data and optimizer.

    python benchmarks/compile_speed.py [--experiment moe_small] [--batch 8] [--seq-len 256] [--steps 8]
                                       [--json docs/compile_speed.json]

Two copies of the model (same initialization): one eager, one with the regions `train.compile=true`
compiles (dsv3/train/compile.py). Compilation time = the compiled copy's first step minus the eager
copy's median step (the first forward and backward of each region compile it). Then both take
--steps full optimizer steps alternately, so that other load on the machine hits both alike; the
ratio of their median step times is the speed-up. fp32 on CPU, bf16 autocast on a GPU.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_throughput import load_experiment  # noqa: E402
from dsv3.model import Transformer, init_weights  # noqa: E402
from dsv3.train.compile import compile_regions  # noqa: E402
from dsv3.train.optim import AdamW, parameter_groups  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Contender:
    def __init__(self, cfg, device: torch.device, compiled: bool):
        self.model = Transformer(cfg, grouped_gemm="torch" if device.type == "cpu" else "auto")
        init_weights(self.model, 0, cfg.init_std)
        self.model.to(device).train()
        self.regions = compile_regions(self.model) if compiled else 0
        self.opt = AdamW(parameter_groups(self.model, 0.1), lr=1e-4)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(self, tokens: torch.Tensor) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with self.autocast:
            parts = self.model.losses(tokens[:, :-1], tokens[:, 1:])
        loss = parts.main + 0.3 * torch.stack(parts.mtp).mean() if parts.mtp else parts.main
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="moe_small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "compile_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, _ = load_experiment(args.experiment)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
               for _ in range(args.steps + 2)]
    eager, compiled = Contender(cfg, device, False), Contender(cfg, device, True)
    eager_first = [eager.step(batches[0])[0], eager.step(batches[1])[0]]
    first, _ = compiled.step(batches[0])
    second, _ = compiled.step(batches[1])  # new shapes (e.g. eval, MTP) recompile: the second step shows it
    times = {"eager": [], "compiled": []}
    losses = {"eager": [], "compiled": []}
    for b in batches[2:]:
        for name, c in (("eager", eager), ("compiled", compiled)):
            t, loss = c.step(b)
            times[name].append(t)
            losses[name].append(loss)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "experiment": args.experiment, "batch": args.batch, "seq_len": args.seq_len, "device": str(device),
        "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "regions_compiled": compiled.regions,
        "compile_time_s": first - statistics.median(eager_first), "compiled_second_step_s": second,
        "step_time_s_median": med, "speedup": med["eager"] / med["compiled"],
        "max_rel_loss_difference": max(abs(a - b) / a for a, b in zip(losses["eager"], losses["compiled"])),
    }
    print(json.dumps(result, indent=1))
    print(f"\n| {args.experiment}, {args.batch} x {args.seq_len} tokens, {device}, {args.threads} thread(s) | "
          f"eager | compiled |\n|---|---:|---:|\n| median step (s) | {med['eager']:.3f} | {med['compiled']:.3f} "
          f"({result['speedup']:.2f}x) |\n| compilation (first step - eager step) | | {result['compile_time_s']:.0f} s |")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
