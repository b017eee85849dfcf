"""Activation memory per token of the moe_rtx model, per activation-checkpointing mode, measured on CPU.

    python benchmarks/activation_memory.py        # ~10 minutes on 2 shared cores; writes docs/activation_memory.json

moe_rtx's layers at full width (dim 1024, 32 routed experts of 512, top-4, MLA with 16 heads), in BF16
autocast as the rtx_card experiment trains, one sequence. Measured: the bytes the forward leaves
allocated for the backward (the C allocator's bytes in use after the forward minus before it,
dsv3/train/memory.py); no backward runs (what the recomputation costs in time is measured by
benchmarks/zero_memory.py, on the whole step). Two sequence lengths give the
bytes per token (the slope; what does not grow with tokens, such as the BF16 weight copies autocast
saves, cancels), two depths (1 dense + 1 MoE layer, 1 dense + 2 MoE layers) split it into one MoE
layer's and the rest's (embedding, dense layer, head, MTP module). Attention is SDPA, whose memory is
linear in the tokens, so the slope holds at longer sequences.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("none", "full", "moe", "attention")


def rtx_model_config(n_layers: int):
    from hydra import compose, initialize_config_dir

    from dsv3.config.store import register, to_config

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    register()
    with initialize_config_dir(config_dir=root, version_base=None):
        cfg = to_config(compose(config_name="config", overrides=["+experiment=rtx_card", "checkpoint.dir=unused"]))
    cfg.model.n_layers = n_layers
    return cfg.model


def measure(n_layers: int, mode: str, seq: int) -> dict:
    from dsv3.model import Transformer, init_weights
    from dsv3.train.memory import cpu_allocated_bytes
    from dsv3.train.recompute import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Transformer(rtx_model_config(n_layers))
    init_weights(model, seed=1, std=0.02)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 32000, (1, seq + 1), generator=torch.Generator().manual_seed(2))
    gc.collect()   # the previous model's cycles must not be freed during the measurement
    start = time.perf_counter()
    before = cpu_allocated_bytes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = model.losses(tokens[:, :-1], tokens[:, 1:])
        loss = parts.main + 0.3 * torch.stack(parts.mtp).mean()
    kept = cpu_allocated_bytes() - before
    seconds = time.perf_counter() - start
    return {"n_layers": n_layers, "mode": mode, "tokens": seq, "bytes": kept, "seconds": seconds,
            "n_params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="512,2048")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "docs", "activation_memory.json"))
    a = ap.parse_args()
    short, long = (int(x) for x in a.seqs.split(","))
    rows = []
    for mode in MODES:
        for n_layers in (2, 3):
            for seq in (short, long):
                rows.append(measure(n_layers, mode, seq))
                r = rows[-1]
                print(f"{mode:10s} layers={n_layers} tokens={seq:5d} {r['bytes'] / 2**20:8.1f} MiB "
                      f"{r['seconds']:6.2f} s", flush=True)

    def row(mode, n_layers, seq):
        return next(r for r in rows if (r["mode"], r["n_layers"], r["tokens"]) == (mode, n_layers, seq))

    summary = {}
    for mode in MODES:
        slope = {n: (row(mode, n, long)["bytes"] - row(mode, n, short)["bytes"]) / (long - short) for n in (2, 3)}
        summary[mode] = {"moe_layer_bytes_per_token": slope[3] - slope[2],
                         "rest_bytes_per_token": slope[2] - (slope[3] - slope[2]),
                         "forward_s": row(mode, 3, long)["seconds"]}
    for mode in MODES:
        s, base = summary[mode], summary["none"]
        s["moe_layer_vs_none"] = s["moe_layer_bytes_per_token"] / base["moe_layer_bytes_per_token"]
        s["forward_time_vs_none"] = s["forward_s"] / base["forward_s"]
    print(f"{'mode':10s} {'MoE layer B/token':>18s} {'rest B/token':>13s} {'vs none':>8s}")
    for mode, s in summary.items():
        print(f"{mode:10s} {s['moe_layer_bytes_per_token']:18.0f} {s['rest_bytes_per_token']:13.0f} "
              f"{s['moe_layer_vs_none']:8.2f}")
    with open(a.out, "w") as f:
        json.dump({"seqs": [short, long], "autocast": "bf16", "threads": torch.get_num_threads(), "rows": rows,
                   "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
