"""Microbenchmark of the csrc/ dispatch/combine kernels: layout, permute (BF16 and FP8), combine and
its backward, against the plain-PyTorch twins measured in the same run.

    python benchmarks/kernels/dispatch.py [--tokens 2048 --hidden 2048 ...] [--json out.json]

Bytes are the minimum traffic of each op (every input read once, every output written once), per
token of the layer's input; on a GPU also GB/s. The numbers in docs/kernels.md come from this script.
"""
import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.timing import seconds_per_call  # noqa: E402
from dsv3.kernels import dispatch, dispatch_reference  # noqa: E402


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(args, device):
    """(name, kernel call, twin call, bytes moved) for every op, on one random routing."""
    g = torch.Generator().manual_seed(0)
    t, k, e, r, h = args.tokens, args.topk, args.experts, args.ranks, args.hidden
    topk = torch.rand(t, e, generator=g).topk(k, dim=1).indices.to(device)
    w = torch.rand(t, k, generator=g).to(device)
    x = torch.randn(t, h, generator=g).to(device, torch.bfloat16)
    lay = dispatch.dispatch_layout(topk, e, r)
    rows, pairs = len(lay.send_token), len(lay.pair_src)
    send = dispatch.permute(x, lay.send_token, lay.token_row)
    q, s = dispatch.permute_fp8(x, lay.send_token)
    y = torch.randn(pairs, h, generator=g).to(device, torch.bfloat16)
    out = dispatch.combine(y, lay.pair_pos, lay.pair_src, w)
    idx = [lay.tokens_per_expert, lay.token_row, lay.send_token, lay.send_topk, lay.pair_row, lay.pair_pos,
           lay.pair_src]
    return [
        ("layout", lambda: dispatch.dispatch_layout(topk, e, r),
         lambda: dispatch_reference.dispatch_layout(topk, e, r), nbytes(topk, *idx)),
        ("permute bf16", lambda: dispatch.permute(x, lay.send_token, lay.token_row),
         lambda: dispatch_reference.permute(x, lay.send_token, lay.token_row), 2 * nbytes(send) + nbytes(lay.send_token)),
        ("permute fp8", lambda: dispatch.permute_fp8(x, lay.send_token),
         lambda: dispatch_reference.permute_fp8(x, lay.send_token), nbytes(send, q, s, lay.send_token)),
        ("permute backward", lambda: dispatch.permute_backward(send, lay.token_row),
         lambda: dispatch_reference.permute_backward(send, lay.token_row), nbytes(send, x, lay.token_row)),
        ("combine", lambda: dispatch.combine(y, lay.pair_pos, lay.pair_src, w),
         lambda: dispatch_reference.combine(y, lay.pair_pos, lay.pair_src, w), nbytes(y, out, w, lay.pair_pos)),
        ("combine backward", lambda: dispatch.combine_backward(out, y, lay.pair_pos, lay.pair_src, w),
         lambda: dispatch_reference.combine_backward(out, y, lay.pair_pos, lay.pair_src, w),
         nbytes(out, y, y, w, w, lay.pair_pos, lay.pair_src)),
    ], dict(send_rows=rows, return_rows=pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)

    ops, sizes = cases(args, device)
    results = []
    for name, kernel, twin, moved in ops:
        tk, tt = seconds_per_call(kernel, device, args.iters), seconds_per_call(twin, device, args.iters)
        results.append(dict(op=name, kernel_ms=tk * 1e3, twin_ms=tt * 1e3, speedup_vs_twin=tt / tk,
                            bytes_per_token=moved / args.tokens, gb_per_s=moved / tk / 1e9))
    report = dict(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                  host=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  shape=vars(args) | sizes, results=results)

    print(f"{report['device']} ({report['threads']} threads): T={args.tokens} K={args.topk} E={args.experts} "
          f"R={args.ranks} H={args.hidden}, {sizes['send_rows']} send rows, {sizes['return_rows']} return rows")
    print(f"{'op':<18}{'kernel ms':>11}{'twin ms':>11}{'x twin':>9}{'B/token':>10}{'GB/s':>8}")
    for row in results:
        print(f"{row['op']:<18}{row['kernel_ms']:>11.3f}{row['twin_ms']:>11.3f}{row['speedup_vs_twin']:>9.2f}"
              f"{row['bytes_per_token']:>10.0f}{row['gb_per_s']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
