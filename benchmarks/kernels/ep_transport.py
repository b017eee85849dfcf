"""The EP transports on CPU, ep ranks as processes on this machine: dispatch and combine exchanges through
the direct transport (rows written into the peers' shared memory) against gloo's all_to_all_single,
measured in the same run.

    python benchmarks/kernels/ep_transport.py [--ep 2 4 --tokens 256 1024 2048] [--json out.json] [--write-docs]
                                              [--plot docs/img/ep_transport_cpu.png]

V3-like rows: hidden 7168, top-8 of 256 experts (uniform random routing). Dispatch = the counts exchange
plus every (token, destination rank) row in FP8 with its 1x128 scales and its local expert ids
(7168 + 224 + 64 bytes), and the same in BF16 (14336 + 64 bytes: no quantization, which on a CPU
costs more than moving the rows); combine = every (token, k) expert output back in BF16 (14336 bytes). Both
transports run the same kernels to produce the rows (the FP8 quantization included); the all-to-all
writes them to a send buffer and moves that, the direct transport writes them into the receivers'
buffers. Times: the median over iterations of each rank's time per exchange, the slowest rank's;
GB/s: the bytes a rank receives (from every rank, itself included) per second, averaged over ranks.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

# the checkout: dsv3, and the multi-process launcher of the tests
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "kernels.md")
BEGIN = "<!-- ep-transport-table:begin (benchmarks/kernels/ep_transport.py --write-docs) -->"
END = "<!-- ep-transport-table:end -->"
OPS = {"dispatch": "dispatch FP8", "dispatch_bf16": "dispatch BF16", "combine": "combine BF16"}


def worker(rank: int, world: int, cfg: dict) -> list[dict]:
    from dsv3.kernels import dispatch
    from dsv3.parallel.ep_transport import AllToAllTransport, DirectTransport, Gather, GatherFp8

    group = dist.group.WORLD
    transports = [DirectTransport(group, torch.device("cpu")), AllToAllTransport(group)]
    h, k, e = cfg["hidden"], cfg["topk"], cfg["experts"]
    out = []
    for tokens in cfg["tokens"]:
        g = torch.Generator().manual_seed(1000 * tokens + rank)
        topk = torch.rand(tokens, e, generator=g).topk(k, dim=1).indices
        x = torch.randn(tokens, h, generator=g).to(torch.bfloat16)
        lay = dispatch.dispatch_layout(topk, e, world)
        counts = torch.stack([lay.tokens_per_rank, lay.pairs_per_rank], dim=1)
        topk_rows = Gather(lay.send_topk, torch.arange(lay.send_topk.shape[0]))
        result = dict(ep=world, tokens=tokens)
        # The combine's splits, from each transport's own counts exchange (direct: with the full matrix).
        pairs = {tr.kind: tr.exchange_counts(counts)[1].reversed() for tr in transports}
        y = torch.randn(sum(pairs["direct"].send), h, generator=g).to(torch.bfloat16)  # this rank's expert outputs
        y_rows = Gather(y, torch.arange(y.shape[0]))

        def exchange(tr, rows, counted: bool) -> int:
            """Dispatch: the counts exchange, then the rows; combine: the rows (the counts are known)."""
            splits = tr.exchange_counts(counts)[0] if counted else pairs[tr.kind]
            pending = tr.issue(rows, splits)
            received = tr.wait(pending)
            tr.release(pending)
            return received[0].shape[0]

        ops = {"dispatch": (lambda tr: exchange(tr, [GatherFp8(x, lay.send_token), topk_rows], True),
                            h + 4 * -(-h // 128) + 8 * k),
               "dispatch_bf16": (lambda tr: exchange(tr, [Gather(x, lay.send_token), topk_rows], True), 2 * h + 8 * k),
               "combine": (lambda tr: exchange(tr, [y_rows], False), 2 * h)}
        for name, (op, row_bytes) in ops.items():
            rows = [op(tr) for tr in transports][0]  # warm-up: buffers grow, pages are touched
            times = {tr.kind: [] for tr in transports}
            for _ in range(cfg["iters"]):  # interleaved, so that a change in the machine's load hits both
                for tr in transports:
                    t0 = time.perf_counter()
                    op(tr)
                    times[tr.kind].append(time.perf_counter() - t0)
            for kind, ts in times.items():
                result[f"{name}_{kind}_s"] = statistics.median(ts)
            result[f"{name}_rows"] = rows
            result[f"{name}_bytes"] = rows * row_bytes
        out.append(result)
    transports[0].close()
    return out


def merge(per_rank: list[list[dict]]) -> list[dict]:
    """Per configuration: the slowest rank's time, the mean received bytes and rows."""
    merged = []
    for results in zip(*per_rank):
        m = dict(ep=results[0]["ep"], tokens=results[0]["tokens"])
        for key in results[0]:
            if key.endswith("_s"):
                m[key] = max(r[key] for r in results)
            elif key.endswith(("_bytes", "_rows")):
                m[key] = statistics.mean(r[key] for r in results)
        for op in OPS:
            for kind in ("direct", "all_to_all"):
                m[f"{op}_{kind}_GBps"] = m[f"{op}_bytes"] / m[f"{op}_{kind}_s"] / 1e9
            m[f"{op}_speedup"] = m[f"{op}_all_to_all_s"] / m[f"{op}_direct_s"]
        merged.append(m)
    return merged


def table(rows: list[dict]) -> str:
    lines = ["| ep | tokens/rank | op | rows received/rank | MB received/rank | direct ms | all_to_all ms | "
             "direct GB/s | all_to_all GB/s | direct speedup |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        for op in OPS:
            lines.append(f"| {m['ep']} | {m['tokens']} | {OPS[op]} | {m[f'{op}_rows']:.0f} | "
                         f"{m[f'{op}_bytes'] / 1e6:.1f} | "
                         f"{m[f'{op}_direct_s'] * 1e3:.2f} | {m[f'{op}_all_to_all_s'] * 1e3:.2f} | "
                         f"{m[f'{op}_direct_GBps']:.2f} | {m[f'{op}_all_to_all_GBps']:.2f} | "
                         f"{m[f'{op}_speedup']:.1f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """GB/s received per rank, direct vs all_to_all, one panel per ep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted({m["ep"] for m in rows})
    fig, axes = plt.subplots(1, len(eps), figsize=(6 * len(eps), 4.4), squeeze=False)
    for ax, ep in zip(axes[0], eps):
        mine = [m for m in rows if m["ep"] == ep]
        labels = [f"{OPS[op]}, {m['tokens']} tokens" for op in OPS for m in mine]
        x = range(len(labels))
        for i, (kind, color) in enumerate((("direct", "tab:blue"), ("all_to_all", "tab:gray"))):
            values = [m[f"{op}_{kind}_GBps"] for op in OPS for m in mine]
            ax.bar([j + (i - 0.5) * 0.4 for j in x], values, 0.4, label=kind, color=color)
        ax.set_xticks(list(x), labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("GB/s received per rank")
        ax.set_title(f"ep={ep}: direct vs gloo all_to_all_single (CPU, 1 thread per rank)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from tests.parallel.distributed_testing import run_ranks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--write-docs", action="store_true", help=f"replace the table between the markers in {DOC}")
    p.add_argument("--plot", help="also draw the GB/s as a PNG here")
    p.add_argument("--replot", metavar="JSON", help="only draw --plot from an earlier run's --json")
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["results"], args.plot)
        return
    cfg = dict(hidden=args.hidden, topk=args.topk, experts=args.experts, tokens=args.tokens, iters=args.iters)
    rows = []
    for ep in args.ep:
        rows += merge(run_ranks(worker, ep, cfg, timeout=1800))
        print(table(rows[-len(args.tokens):]), flush=True)
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                threads_per_rank=1, **cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    if args.write_docs:
        with open(DOC) as f:
            doc = f.read()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        with open(DOC, "w") as f:
            f.write(doc[:start] + "\n" + table(rows) + "\n" + doc[end:])


if __name__ == "__main__":
    main()
