"""Shared pieces of the Triton kernel benchmarks (grouped_gemm.py, fp8_grouped_gemm.py, fp8_quant.py):
arguments, routed row counts, timing, the printed table and the JSON file.

Two modes:
- GPU (default): each implementation of a case is timed with `triton.testing.do_bench` (median);
  rates are TFLOP/s for GEMMs and GB/s (minimum traffic) for quantization.
- `--check` (CPU): every Triton kernel runs in Triton's interpreter at small shapes and is compared
  with its twin; the table reports the max error per case and the exit status is 1 on any miss.
"""
import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def parse_args(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="CPU correctness mode: Triton interpreter, small shapes, compare with the twins, "
                        "exit 1 on a miss")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 256], help="local experts per rank")
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the batch being routed")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--total-experts", type=int, default=256, help="routed experts of the model")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048, help="expert intermediate size")
    p.add_argument("--align", type=int, default=16,
                   help="round each expert's row count up to a multiple of this, as an aligned dispatch "
                        "(dispatch_layout(align=...)) does; torch._grouped_mm's K-grouped baseline needs 8+ "
                        "(1 in --check mode, which keeps the awkward counts)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args()
    if args.check:
        # Must precede the first `import triton` (callers import dsv3.kernels.triton after this).
        os.environ["TRITON_INTERPRET"] = "1"
        args.experts, args.tokens, args.total_experts, args.hidden, args.inter = [3, 5], 48, 12, 160, 80
        args.align = 1
    elif args.total_experts < max(args.experts):
        p.error(f"--experts {max(args.experts)} exceeds --total-experts {args.total_experts}")
    return args


def routed_counts(tokens: int, topk: int, total_experts: int, local_experts: int, seed: int = 0,
                  align: int = 1) -> list[int]:
    """Rows each of this rank's `local_experts` receives when every token picks top-k of
    `total_experts` uniformly at random (the expert-parallel view: the rank holds the first ones),
    each rounded up to a multiple of `align`."""
    import torch
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(tokens, total_experts, generator=g).topk(topk, dim=1).indices
    counts = torch.bincount(picks.flatten(), minlength=total_experts)[:local_experts].tolist()
    if len(counts) > 1:  # keep the edge cases of the layout in every run: an empty and a one-row expert
        counts[0], counts[1] = 0, 1
    counts = [-(-c // align) * align for c in counts]
    # torch._grouped_mm (a baseline) needs 16-byte aligned strides: the wgrad operands [N, M] have
    # row stride M, so the total row count is made a multiple of 16.
    counts[-1] += -sum(counts) % 16
    return counts


@dataclass
class Case:
    """One operation at one shape: its implementations (name -> zero-argument callable), the work it
    does (flops or bytes) for rates, and for --check a twin and how to compare with it."""
    op: str
    shape: str
    impls: dict[str, Callable]
    flops: float = 0.0
    nbytes: float = 0.0
    twin: Callable | None = None
    compare: Callable | None = None  # (kernel output, twin output) -> (error, tolerance)
    meta: dict = field(default_factory=dict)


def _median_ms(fn: Callable) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(cases, args: argparse.Namespace, title: str) -> int:
    """Time (or --check) every case of the iterable; print and save the table; 1 if a check missed."""
    rows = []
    for c in cases:
        if args.check:
            want = c.twin()
            for impl, fn in c.impls.items():
                row = dict(op=c.op, shape=c.shape, impl=impl, **c.meta)
                try:
                    err, tol = c.compare(fn(), want)
                except Exception as exc:
                    row.update(ok=False, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                else:
                    row.update(error=err, tolerance=tol, ok=bool(err <= tol))
                rows.append(row)
            continue
        for impl, fn in c.impls.items():
            row = dict(op=c.op, shape=c.shape, impl=impl, **c.meta)
            try:
                ms = _median_ms(fn)
            except Exception as exc:  # a baseline this GPU / torch build lacks: say so, keep going
                row.update(ms=None, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            else:
                row["ms"] = ms
                if c.flops:
                    row["TFLOP/s"] = c.flops / ms / 1e9
                if c.nbytes:
                    row["GB/s"] = c.nbytes / ms / 1e6
            rows.append(row)
    _print_table(rows, title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(title=title, mode="check" if args.check else "gpu", environment=_environment(),
                           args=vars(args), rows=rows), f, indent=1)
    misses = [r for r in rows if r.get("ok") is False]
    if misses:
        print(f"{len(misses)} case(s) outside tolerance", file=sys.stderr)
    return 1 if misses else 0


def _environment() -> dict:
    import torch
    import triton
    env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               machine=platform.machine())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _print_table(rows: list[dict], title: str) -> None:
    cols = [k for k in dict.fromkeys(k for r in rows for k in r)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    print(f"\n{title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k)) for k in cols) + " |")


def max_rel_error(tol: float):
    """compare(): max |got - want| / max |want| over all outputs (tuples, Fp8Tensors), against `tol`."""

    def compare(got, want):
        got, want = (t if isinstance(t, tuple) else (t,) for t in (got, want))
        err = 0.0  # zip: a baseline may return fewer outputs (e.g. h without gate_up)
        for a, b in zip(got, want):
            if a is None and b is None:
                continue
            a, b = a.float(), b.float()
            scale = b.abs().max().item() or 1.0
            err = max(err, (a - b).abs().max().item() / scale)
        return err, tol
    return compare
