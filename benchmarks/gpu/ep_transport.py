"""The EP transport's kernels on one GPU: how fast they write rows through per-row addresses (what the
direct transport does into peers' memory), against the memory bandwidth measured in the same run.

    python benchmarks/gpu/ep_transport.py [--json OUT.json]                    # on a GPU
    python benchmarks/gpu/ep_transport.py --dry-run [--json OUT.json]          # here: tiny shapes, CPU

`run()` returns the same report for the GPU check. With one GPU every destination "rank" is a region of
this GPU's memory, so this measures the kernels (address computation, gathers, FP8 quantization,
reductions, the scattered row stores), not NVLink: on a node, an exchange cannot go faster than the
slower of these and the links. GB/s counts the bytes each kernel must read and write once. Baselines,
same run: `copy_` of the same bytes (device-to-device copy: the memory bandwidth), and the local row
gather (`gather_rows`, the all-to-all transport's send-buffer kernel).

V3 shapes: hidden 7168, top-8 of 256 experts routed uniformly over 8 ranks; dispatch rows in FP8 with
1x128 scales (or BF16), combine rows in BF16, the dispatch backward as a reduction over two rows.
"""
import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.timing import seconds_per_call  # noqa: E402


def _regions(counts: list[int], row_bytes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One buffer holding a 128-byte aligned region per destination rank; (buffer, region addresses)."""
    sizes = [-(-c * row_bytes // 128) * 128 for c in counts]
    buf = torch.empty(sum(sizes) + 128, dtype=torch.uint8, device=device)
    start = -(-buf.data_ptr() // 128) * 128
    bases, offset = [], 0
    for s in sizes:
        bases.append(start + offset)
        offset += s
    return buf, torch.tensor(bases, dtype=torch.int64, device=device)


def measure(device: torch.device, tokens: list[int], hidden: int = 7168, topk: int = 8, experts: int = 256,
            ranks: int = 8, iters: int = 20) -> list[dict]:
    from dsv3.kernels import dispatch

    ext, rows_out = dispatch.extension(), []
    groups = -(-hidden // 128)
    for t in tokens:
        g = torch.Generator().manual_seed(t)
        idx = torch.rand(t, experts, generator=g).topk(topk, dim=1).indices.to(device)
        x = torch.randn(t, hidden, generator=g).to(device, torch.bfloat16)
        lay = dispatch.dispatch_layout(idx, experts, ranks)
        s_rows, pairs = lay.send_token.shape[0], lay.pair_src.shape[0]
        send_counts = lay.tokens_per_rank.tolist()
        seg_end = lay.rank_offsets
        zero = torch.zeros(ranks, dtype=torch.int64, device=device)
        y = torch.randn(pairs, hidden, generator=g).to(device, torch.bfloat16)
        back = torch.randperm(pairs, generator=g).to(device)
        pair_end = lay.pair_offsets
        index = torch.randint(-1, s_rows, (s_rows, 2), generator=g).to(device)
        grad = torch.randn(s_rows, hidden, generator=g).to(device, torch.bfloat16)

        q_buf, q_base = _regions(send_counts, hidden, device)
        s_buf, s_base = _regions(send_counts, 4 * groups, device)
        d_buf, d_base = _regions(send_counts, 2 * hidden, device)
        c_buf, c_base = _regions(lay.pairs_per_rank.tolist(), 2 * hidden, device)
        q_addr = ext.row_addresses(seg_end, zero, q_base, s_rows, hidden)
        s_addr = ext.row_addresses(seg_end, zero, s_base, s_rows, 4 * groups)
        d_addr = ext.row_addresses(seg_end, zero, d_base, s_rows, 2 * hidden)
        c_addr = ext.row_addresses(pair_end, zero, c_base, pairs, 2 * hidden)
        src_copy = torch.empty(s_rows, hidden, dtype=torch.bfloat16, device=device)
        dst_copy = torch.empty_like(src_copy)
        valid = int((index >= 0).sum())
        bf16_row = 2 * hidden
        cases = [
            ("copy_ (memory bandwidth)", lambda: dst_copy.copy_(src_copy), 2 * s_rows * bf16_row),
            ("local gather (all_to_all send buffer)", lambda: dispatch.gather_rows(x, lay.send_token),
             2 * s_rows * bf16_row),
            ("row addresses", lambda: ext.row_addresses(seg_end, zero, d_base, s_rows, bf16_row), 8 * s_rows),
            ("dispatch put bf16", lambda: ext.put_rows(x, lay.send_token, d_addr), 2 * s_rows * bf16_row),
            ("dispatch put fp8 + scales", lambda: ext.put_rows_fp8(x, lay.send_token, q_addr, s_addr),
             s_rows * (bf16_row + hidden + 4 * groups)),
            ("combine put bf16", lambda: ext.put_rows(y, back, c_addr), 2 * pairs * bf16_row),
            ("dispatch backward put (reduce of 2)", lambda: ext.put_reduce(grad, index, d_addr, None, torch.bfloat16),
             (valid + s_rows) * bf16_row),
        ]
        results = []
        for name, fn, nbytes in cases:
            s = seconds_per_call(fn, device, iters)
            results.append(dict(tokens=t, op=name, rows=pairs if name.startswith("combine") else s_rows,
                                ms=s * 1e3, gb_per_s=nbytes / s / 1e9))
        ceiling = results[0]["gb_per_s"]
        for r in results:
            r["of_copy"] = r["gb_per_s"] / ceiling
        rows_out += results
        del q_buf, s_buf, d_buf, c_buf
    return rows_out


def run(dry_run: bool = False) -> dict:
    """The report: {"mode", "device", "shape", "rows": [{tokens, op, rows, ms, gb_per_s, of_copy}]}."""
    if dry_run:
        device, shape = torch.device("cpu"), dict(tokens=[64, 256], hidden=384, topk=4, experts=16, ranks=4, iters=2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/gpu/ep_transport.py: no CUDA device (use --dry-run on a CPU)")
        device, shape = torch.device("cuda"), dict(tokens=[1024, 4096, 16384])
    rows = measure(device, **shape)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    return dict(mode="dry-run" if dry_run else "gpu", device=name, shape=shape, rows=rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script, not a GPU)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args()
    report = run(args.dry_run)
    print(f"EP transport kernels on {report['device']} ({report['mode']}); GB/s = bytes read + written once")
    print("| tokens | op | rows | ms | GB/s | of copy_ |\n|---:|---|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(f"| {r['tokens']} | {r['op']} | {r['rows']} | {r['ms']:.3f} | {r['gb_per_s']:.1f} | {r['of_copy']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
