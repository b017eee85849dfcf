"""Training-step throughput of dsv3 against Hugging Face's DeepseekV3 on the same config, data and batch.

    python benchmarks/train_throughput.py [--experiment moe_small] [--steps 6] [--out results.json]

Both run a full optimizer step (forward, loss, backward, clipping, AdamW) in fp32 on this machine,
measured alternately in one process so that load on the machine hits both alike; the figure that
matters is the ratio. HF's experts use its fastest implementation here (`grouped_mm`), attention SDPA.
Model FLOPs utilisation is against the fp32 matmul rate of this machine measured in the same run.
MTP is switched off for the comparison (HF's model has none); a third row shows dsv3 with it on.
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

from dsv3.config.schema import DataConfig, ModelConfig  # noqa: E402
from dsv3.data import GlobalSampler, PackedDataset, shard_directory  # noqa: E402
from dsv3.model import Transformer, init_weights  # noqa: E402
from dsv3.model.hf_format import hf_config, to_hf_state_dict  # noqa: E402
from dsv3.train.optim import AdamW, parameter_groups  # noqa: E402

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


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x (activated matmul parameters) + attention's QK^T and PV (x3 for forward and backward)."""
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = (cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank * cfg.n_heads * qk) if cfg.q_lora_rank else cfg.dim * cfg.n_heads * qk
    attn = (q + cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            + cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) + cfg.n_heads * cfg.v_head_dim * cfg.dim)
    moe = 3 * cfg.dim * cfg.moe_inter_dim * (cfg.n_activated_experts + cfg.n_shared_experts) + cfg.dim * cfg.n_routed_experts
    dense = 3 * cfg.dim * cfg.inter_dim
    blocks = cfg.n_layers + cfg.mtp_depth
    params = (blocks * attn + cfg.n_dense_layers * dense + (blocks - cfg.n_dense_layers) * moe
              + cfg.dim * cfg.vocab_size * (1 + cfg.mtp_depth) + cfg.mtp_depth * 2 * cfg.dim * cfg.dim)
    # causal attention: on average seq_len / 2 keys per query, QK^T and PV, 2 flops per MAC
    attn_core = blocks * cfg.n_heads * (qk + cfg.v_head_dim) * seq_len / 2 * 2
    return 6 * params + 3 * attn_core


class OursStep:
    def __init__(self, cfg: ModelConfig, seed: int):
        self.model = Transformer(cfg)
        init_weights(self.model, seed, cfg.init_std)
        self.opt = AdamW(parameter_groups(self.model, 0.1), lr=1e-4, betas=(0.9, 0.95))
        for moe in self.model.moe_layers():
            moe.balance_loss_coeff = 1e-4

    def __call__(self, batch: torch.Tensor) -> float:
        parts = self.model.losses(batch[:, :-1], batch[:, 1:])
        loss = parts.main + (0.3 * torch.stack(parts.mtp).mean() if parts.mtp else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return parts.main.item()


class HFStep:
    def __init__(self, cfg: ModelConfig, state_dict: dict, experts_impl: str):
        import tempfile

        import transformers

        from dsv3.model.hf_format import save_hf

        with tempfile.TemporaryDirectory() as d:
            save_hf(d, cfg, state_dict)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                d, attn_implementation="sdpa", experts_implementation=experts_impl)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     foreach=True)

    def __call__(self, batch: torch.Tensor) -> float:
        out = self.model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="moe_small")
    p.add_argument("--steps", type=int, default=6, help="measured steps per contender (after 2 warmup steps)")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (default: the experiment's micro-batch)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_throughput.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg, exp = load_experiment(args.experiment)
    seq_len = exp["data"]["seq_len"]
    batch_size = args.batch or exp["train"]["micro_batch_size"]
    data = PackedDataset(shard_directory(DataConfig(), cfg.vocab_size), "train", seq_len)
    sampler = GlobalSampler(len(data), 0)
    batches = [data.batch(sampler(i * batch_size, batch_size)).tokens for i in range(args.steps + 2)]

    same = dataclasses.replace(cfg, mtp_depth=0)
    ours_same = OursStep(same, seed=0)
    hf_impl = "grouped_mm"
    contenders = {
        "dsv3 (no MTP)": ours_same,
        f"HF DeepseekV3 ({hf_impl} experts, sdpa)": HFStep(same, ours_same.model.state_dict(), hf_impl),
        "dsv3 (MTP on, as trained)": OursStep(cfg, seed=0),
    }
    times = {name: [] for name in contenders}
    losses = {name: [] for name in contenders}
    for i, batch in enumerate(batches):
        for name, step in contenders.items():  # interleaved: the same machine state for every contender
            t = _timed(lambda: losses[name].append(step(batch)))
            if i >= 2:
                times[name].append(t)
    peak = matmul_tflops()
    tokens = batch_size * seq_len
    rows = []
    hf_name = list(contenders)[1]
    for name in contenders:
        med = statistics.median(times[name])
        model_cfg = cfg if "MTP on" in name else same
        flops = model_flops_per_token(model_cfg, seq_len) * tokens
        rows.append({"contender": name, "step_s": med, "tokens_per_s": tokens / med,
                     "speedup_vs_hf": statistics.median(times[hf_name]) / med,
                     "mfu": flops / med / (peak * 1e12), "first_loss": losses[name][0]})
    result = {"experiment": args.experiment, "batch": batch_size, "seq_len": seq_len, "steps": args.steps,
              "threads": torch.get_num_threads(), "fp32_matmul_tflops": peak, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{args.experiment}: batch {batch_size} x {seq_len} tokens, {torch.get_num_threads()} threads, "
          f"fp32 matmul {peak * 1e3:.0f} GFLOP/s")
    print(f"{'contender':<44} {'step s':>8} {'tok/s':>9} {'vs HF':>7} {'MFU':>6}")
    for r in rows:
        print(f"{r['contender']:<44} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['speedup_vs_hf']:>6.2f}x "
              f"{r['mfu'] * 100:>5.1f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
