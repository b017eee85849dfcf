"""Benchmark of the Triton grouped GEMMs (bf16) on the six GEMMs of the routed-expert MLP, at
DeepSeek-V3 shapes (hidden 7168, expert inter 2048), against `torch._grouped_mm`, a per-expert
`torch.matmul` loop and one dense GEMM of the same FLOPs.

    python benchmarks/kernels/grouped_gemm.py [--experts 8 32 256] [--tokens 4096] [--json out.json]   # GPU
    python benchmarks/kernels/grouped_gemm.py --check                                                   # CPU

Rows per expert: `--tokens` tokens route top-`--topk` of `--total-experts` uniformly; this rank holds
`--experts` of them (expert parallelism), so rows ~ tokens * topk * experts / total_experts.
"""
import itertools

import torch
from triton_bench import Case, max_rel_error, parse_args, routed_counts, run


def _loop(bounds, fn):
    return [fn(e, a, b) for e, (a, b) in enumerate(bounds)]


def _loop_linear(x, w, bounds, out_cols, transpose=True):
    y = x.new_empty(x.shape[0], out_cols)
    _loop(bounds, lambda e, a, b: y[a:b].copy_(x[a:b] @ (w[e].t() if transpose else w[e])))
    return y


def _loop_wgrad(dy, x, bounds):
    return torch.stack(_loop(bounds, lambda e, a, b: dy[a:b].t() @ x[a:b]))


def cases(args, device, dtype):
    """One expert count at a time, so that only its tensors are alive (E=256 weights alone take 22 GB)."""
    for E in args.experts:
        yield from _cases(args, E, device, dtype)


def _cases(args, E, device, dtype) -> list[Case]:
    """The six GEMMs for E local experts (a function of its own so that the lambdas bind this E's tensors).
    --check drops the dense GEMM: it computes something else, every other implementation must match the twin."""
    from dsv3.kernels import reference as ref
    from dsv3.kernels import triton as tk
    H, I = args.hidden, args.inter
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]  # baselines round bf16 in other places
    out = []
    counts = routed_counts(args.tokens, args.topk, args.total_experts, E, align=args.align)
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    bounds = ref.expert_bounds(offs)
    M = sum(counts)
    g = torch.Generator(device=device).manual_seed(E)
    r = lambda *s, scale=1.0: (torch.randn(*s, device=device, generator=g) * scale).to(dtype)  # noqa: E731
    x, dy, h = r(M, H), r(M, H), r(M, I)
    gate_up, d_gate_up = r(M, 2 * I), r(M, 2 * I)
    w13, w2 = r(E, 2 * I, H, scale=H ** -0.5), r(E, H, I, scale=I ** -0.5)
    dy_t, d_gate_up_t = dy.t().contiguous(), d_gate_up.t().contiguous()
    meta = dict(experts=E, rows=M, dtype=str(dtype).removeprefix("torch."))

    def case(op, flops, impls, twin):
        if args.check:
            impls.pop("dense same FLOPs")
        out.append(Case(op, f"E={E} M={M}", impls, flops=flops, twin=twin, compare=max_rel_error(tol), meta=meta))

    case("gate_up + SwiGLU", 2 * M * H * 2 * I, {
        "triton": lambda: tk.gate_up_swiglu(x, w13, offs),
        "torch._grouped_mm": lambda: ref.swiglu(torch._grouped_mm(x, w13.mT, offs=offs)),
        "matmul loop": lambda: ref.swiglu(_loop_linear(x, w13, bounds, 2 * I)),
        "dense same FLOPs": lambda: ref.swiglu(x @ w13[0].t()),
    }, lambda: ref.gate_up_swiglu(x, w13, offs))
    case("down", 2 * M * I * H, {
        "triton": lambda: tk.grouped_linear(h, w2, offs),
        "torch._grouped_mm": lambda: torch._grouped_mm(h, w2.mT, offs=offs),
        "matmul loop": lambda: _loop_linear(h, w2, bounds, H),
        "dense same FLOPs": lambda: h @ w2[0].t(),
    }, lambda: ref.grouped_linear(h, w2, offs))
    case("down dgrad + SwiGLU backward", 2 * M * H * I, {
        "triton": lambda: tk.swiglu_dgrad(dy, w2, gate_up, offs),
        "torch._grouped_mm": lambda: ref.swiglu_backward(gate_up, torch._grouped_mm(dy, w2, offs=offs)),
        "matmul loop": lambda: ref.swiglu_backward(gate_up, _loop_linear(dy, w2, bounds, I, transpose=False)),
        "dense same FLOPs": lambda: ref.swiglu_backward(gate_up, dy @ w2[0]),
    }, lambda: ref.swiglu_dgrad(dy, w2, gate_up, offs))
    case("gate_up dgrad", 2 * M * 2 * I * H, {
        "triton": lambda: tk.grouped_linear_dgrad(d_gate_up, w13, offs),
        "torch._grouped_mm": lambda: torch._grouped_mm(d_gate_up, w13, offs=offs),
        "matmul loop": lambda: _loop_linear(d_gate_up, w13, bounds, H, transpose=False),
        "dense same FLOPs": lambda: d_gate_up @ w13[0],
    }, lambda: ref.grouped_linear_dgrad(d_gate_up, w13, offs))
    case("down wgrad", 2 * M * H * I, {
        "triton": lambda: tk.grouped_linear_wgrad(dy, h, offs, torch.float32),
        "torch._grouped_mm": lambda: torch._grouped_mm(dy_t, h, offs=offs),
        "matmul loop": lambda: _loop_wgrad(dy, h, bounds),
        "dense same FLOPs": lambda: dy_t @ h,
    }, lambda: ref.grouped_linear_wgrad(dy, h, offs, torch.float32))
    case("gate_up wgrad", 2 * M * 2 * I * H, {
        "triton": lambda: tk.grouped_linear_wgrad(d_gate_up, x, offs, torch.float32),
        "torch._grouped_mm": lambda: torch._grouped_mm(d_gate_up_t, x, offs=offs),
        "matmul loop": lambda: _loop_wgrad(d_gate_up, x, bounds),
        "dense same FLOPs": lambda: d_gate_up_t @ x,
    }, lambda: ref.grouped_linear_wgrad(d_gate_up, x, offs, torch.float32))
    return out


def main() -> int:
    args = parse_args(__doc__)
    if args.check:
        cpu = torch.device("cpu")
        return run(itertools.chain(cases(args, cpu, torch.float32), cases(args, cpu, torch.bfloat16)), args,
                   "Grouped GEMMs vs twins (Triton interpreter, CPU)")
    if not torch.cuda.is_available():
        raise SystemExit("grouped_gemm.py times kernels on a GPU; on CPU run it with --check")
    return run(cases(args, torch.device("cuda"), torch.bfloat16), args, "Grouped GEMMs, bf16 (median of do_bench)")


if __name__ == "__main__":
    raise SystemExit(main())
