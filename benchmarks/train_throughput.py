"""Training-step throughput of dsv3 against Hugging Face's DeepseekV3 on the same config, data and batch.

    python benchmarks/train_throughput.py [--experiment moe_small] [--steps 6] [--out results.json]        # CPU, fp32
    python benchmarks/train_throughput.py --device cuda --precision bf16 fp8 [--batch 32 --seq-len 1024]  # GPU

Every contender runs a full optimizer step (forward, loss, backward, clipping, AdamW). On the CPU (fp32)
the contenders step alternately in one process, so that load on the machine hits all alike; the
figure that matters is the ratio. On a GPU each contender runs alone (warm-up, then measured steps
between synchronizations) and is freed before the next, so its peak memory is its own. HF's experts use
its fastest implementation (`grouped_mm`), attention SDPA; in bf16 both run fp32 master weights under
bf16 autocast. dsv3 in bf16 and fp8 uses the kernels a training run resolves (`kernels.grouped_gemm=auto`:
Triton on a GPU). MTP is off for the comparison (HF's model has none); another row shows dsv3 with it on.
MFU: model FLOPs over the dense matmul rate of this machine in the run's dtype, measured in the same run
(fp32 on CPU; bf16 on a GPU, 8192^3), and on a GPU also over the datasheet peak given by --peak-tflops.
"""
import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.precision import autocast as precision_autocast, compute_dtype  # noqa: E402
from dsv3.config.schema import DataConfig, Fp8Config, ModelConfig  # noqa: E402
from dsv3.data import GlobalSampler, PackedDataset, shard_directory  # noqa: E402
from dsv3.kernels.ops import resolve_grouped_gemm_impl  # noqa: E402
from dsv3.model import Transformer, init_weights  # noqa: E402
from dsv3.model.step_aux import StepAux  # noqa: E402
from dsv3.train.optim import AdamW, parameter_groups  # noqa: E402
from benchmarks.timing import seconds_per_call  # noqa: E402
from dsv3.planner.flops import training_flops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name: str) -> tuple[ModelConfig, dict]:
    with open(os.path.join(ROOT, "configs", "experiment", f"{name}.yaml")) as f:
        exp = yaml.safe_load(f)
    model_name = next(d["override /model"] for d in exp["defaults"] if "override /model" in d)
    with open(os.path.join(ROOT, "configs", "model", f"{model_name}.yaml")) as f:
        model = yaml.safe_load(f)
    return ModelConfig(**model), exp


def matmul_tflops(n: int = 2048, reps: int = 10) -> float:
    """fp32 GEMM rate of this machine (the MFU denominator), best of `reps`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e12


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class OursStep:
    def __init__(self, cfg: ModelConfig, seed: int, device: torch.device = torch.device("cpu"),
                 precision: str = "fp32"):
        compute = compute_dtype(precision, device.type)
        impl = resolve_grouped_gemm_impl("auto", device, compute)
        self.model = Transformer(cfg, grouped_gemm=impl)
        init_weights(self.model, seed, cfg.init_std)
        self.model.to(device)
        self.kernels = impl
        if precision == "fp8":
            from dsv3.fp8 import convert_to_fp8
            fp8_impl = resolve_grouped_gemm_impl("auto", device, compute, fp8=True)
            convert_to_fp8(self.model, Fp8Config(), fp8_impl, device)
            self.kernels = f"fp8 {fp8_impl}"
        self.autocast = precision_autocast(precision, device.type)
        self.opt = AdamW(parameter_groups(self.model, 0.1), lr=1e-4, betas=(0.9, 0.95))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            parts = self.model.losses(batch[:, :-1], batch[:, 1:], aux=StepAux(balance_coeff=1e-4))
            loss = parts.main + (0.3 * torch.stack(parts.mtp).mean() if parts.mtp else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return parts.main.detach()


class HFStep:
    def __init__(self, cfg: ModelConfig, state_dict: dict, experts_impl: str, device: torch.device = torch.device("cpu"),
                 precision: str = "fp32"):
        import tempfile

        import transformers

        from dsv3.model.hf_format import save_hf

        with tempfile.TemporaryDirectory() as d:
            save_hf(d, cfg, state_dict)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                d, attn_implementation="sdpa", experts_implementation=experts_impl)
        self.model.to(device).train()
        self.autocast = precision_autocast(precision, device.type)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     foreach=True)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            out = self.model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.detach()


def gpu_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """Dense bf16 GEMM rate of this GPU (the MFU denominator measured in the run), mean of `reps`."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, torch.device("cuda"), reps, warmup=3) / 1e12


def make_contenders(cfg: ModelConfig, device: torch.device, precisions: list[str], with_hf: bool):
    """name -> (zero-argument builder, model config it trains). Builders run lazily, so a GPU run holds
    one contender at a time; the HF model is built from the first dsv3 contender's initial weights."""
    same = dataclasses.replace(cfg, mtp_depth=0)
    out, first = {}, {}

    def ours(c, precision, keep_weights=False):
        def build():
            step = OursStep(c, seed=0, device=device, precision=precision)
            if keep_weights:
                first["state"] = {k: v.detach().cpu().clone() for k, v in step.model.state_dict().items()}
            return step
        return build

    for i, precision in enumerate(precisions):
        out[f"dsv3 {precision} (no MTP)"] = (ours(same, precision, keep_weights=i == 0), same)
    if with_hf:
        hf_precision = "bf16" if device.type == "cuda" else "fp32"
        out[f"HF DeepseekV3 {hf_precision} (grouped_mm experts, sdpa)"] = (
            lambda: HFStep(same, first["state"], "grouped_mm", device, hf_precision), same)
    out[f"dsv3 {precisions[0]} (MTP on, as trained)"] = (ours(cfg, precisions[0]), cfg)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_interleaved(contenders: dict, batches: list) -> tuple[dict, dict, dict]:
    """Interleaved: every contender steps on batch i before any steps on batch i+1."""
    steps = {name: build() for name, (build, _) in contenders.items()}
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            t = _timed(lambda: losses[name].append(step(batch).item()))
            if i >= 2:
                times[name].append(t)
    return times, losses, {}, {}


def profile_step(step, batch, device: torch.device, top: int = 12) -> list[dict]:
    """Where one step's device time goes: the `top` kernels by total time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(batch)
        _sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    if device.type == "cuda":  # kernels only: operator rows would count their kernels' time again
        events = [e for e in events if getattr(e, "self_device_time_total", 0) > 0]
        key = "self_device_time_total"
    events.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    return [{"name": e.key[:90], "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
            for e in events[:top]]


def measure_sequential(contenders: dict, batches: list, device: torch.device,
                       profile: bool = False) -> tuple[dict, dict, dict, dict]:
    """One contender at a time: build, 2 warm-up steps (Triton compiles there), measured steps, free.
    On a GPU also the contender's peak allocated memory; with `profile`, its top kernels."""
    cuda = device.type == "cuda"
    times, losses, peak, profiles = {}, {}, {}, {}
    for name, (build, _) in contenders.items():
        step = build()
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times[name], out = [], []
        for i, batch in enumerate(batches):
            _sync(device)
            t0 = time.perf_counter()
            out.append(step(batch))
            _sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
        losses[name] = [x.item() for x in out]
        if cuda:
            peak[name] = torch.cuda.max_memory_allocated() / 2 ** 30
        if profile:
            profiles[name] = profile_step(step, batches[-1], device)
        print(f"  {name}: {statistics.median(times[name]) * 1e3:.1f} ms/step, "
              + (f"peak {peak[name]:.2f} GiB, " if cuda else "") + f"first loss {losses[name][0]:.4f}", flush=True)
        del step
        if cuda:
            torch.cuda.empty_cache()
    return times, losses, peak, profiles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="moe_small")
    p.add_argument("--steps", type=int, default=6, help="measured steps per contender (after 2 warmup steps)")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (default: the experiment's micro-batch)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the experiment's)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp8"],
                   help="dsv3 contenders, one per precision (the first also trains with MTP on)")
    p.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face contender")
    p.add_argument("--data", default="auto", choices=["auto", "corpus", "random"],
                   help="corpus: the embedded corpus (its tokenizer needs the model's vocab size, trained on first "
                        "use); random: uniform token ids (throughput does not depend on them). auto: corpus on "
                        "CPU, random on a GPU")
    p.add_argument("--mode", default="auto", choices=["auto", "interleaved", "sequential"],
                   help="interleaved: contenders alternate step by step (CPU default, fair under load); "
                        "sequential: one contender at a time, freed before the next (GPU default, own peak memory)")
    p.add_argument("--profile", action="store_true", help="also record each contender's top kernels in one step")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="datasheet dense peak of this device in the run's dtype, for a second MFU column")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_throughput.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")

    cfg, exp = load_experiment(args.experiment)
    seq_len = args.seq_len or exp["data"]["seq_len"]
    batch_size = args.batch or exp["train"]["micro_batch_size"]
    n_batches = args.steps + 2
    data = args.data if args.data != "auto" else ("random" if device.type == "cuda" else "corpus")
    if data == "corpus":
        dataset = PackedDataset(shard_directory(DataConfig(), cfg.vocab_size), "train", seq_len)
        sampler = GlobalSampler(len(dataset), 0)
        batches = [dataset.batch(sampler(i * batch_size, batch_size)).tokens for i in range(n_batches)]
    else:
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g) for _ in range(n_batches)]
    batches = [b.to(device) for b in batches]

    contenders = make_contenders(cfg, device, args.precision, with_hf=not args.no_hf)
    mode = args.mode if args.mode != "auto" else ("sequential" if device.type == "cuda" else "interleaved")
    if args.profile and mode != "sequential":
        p.error("--profile needs --mode sequential (the default on a GPU)")
    if mode == "sequential":
        times, losses, peak_mem, profiles = measure_sequential(contenders, batches, device, args.profile)
    else:
        times, losses, peak_mem, profiles = measure_interleaved(contenders, batches)
    if device.type == "cuda":
        peak, peak_kind = gpu_matmul_tflops(), "bf16 8192^3 GEMM"
    else:
        peak, peak_kind = matmul_tflops(), "fp32 2048^2 GEMM"
    tokens = batch_size * seq_len
    hf_name = next((n for n in contenders if n.startswith("HF")), None)
    rows = []
    for name, (_, model_cfg) in contenders.items():
        med = statistics.median(times[name])
        flops = training_flops(model_cfg, seq_len).total * tokens
        row = {"contender": name, "step_s": med, "tokens_per_s": tokens / med,
               "mfu": flops / med / (peak * 1e12), "first_loss": losses[name][0]}
        if hf_name:
            row["speedup_vs_hf"] = statistics.median(times[hf_name]) / med
        if args.peak_tflops:
            row["mfu_datasheet"] = flops / med / (args.peak_tflops * 1e12)
        if name in peak_mem:
            row["peak_mem_gib"] = peak_mem[name]
        rows.append(row)
    result = {"experiment": args.experiment, "device": args.device, "mode": mode, "precision": args.precision, "batch": batch_size,
              "seq_len": seq_len, "steps": args.steps, "data": data, "threads": torch.get_num_threads(),
              "matmul_tflops": peak, "matmul_kind": peak_kind, "torch": torch.__version__,
              "machine": (torch.cuda.get_device_name() if device.type == "cuda"
                          else platform.processor() or platform.machine()),
              "cpus": os.cpu_count(), "rows": rows}
    if args.peak_tflops:
        result["datasheet_tflops"] = args.peak_tflops
    if profiles:
        result["profiles"] = profiles
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{args.experiment} on {result['machine']}: batch {batch_size} x {seq_len} tokens, "
          f"{peak_kind} {peak:.3g} TFLOP/s")
    print(f"{'contender':<52} {'step ms':>9} {'tok/s':>10} {'vs HF':>7} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        vs = f"{r['speedup_vs_hf']:>6.2f}x" if "speedup_vs_hf" in r else f"{'':>7}"
        mem = f"{r['peak_mem_gib']:>9.2f}" if "peak_mem_gib" in r else f"{'':>9}"
        print(f"{r['contender']:<52} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} {vs} "
              f"{r['mfu'] * 100:>5.1f}% {mem}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
