"""Benchmark of the FP8 (E4M3, 1x128 / 128x128 / 128x1 scales, fp32 promotion every 128 of K)
grouped GEMMs on the six GEMMs of the routed-expert MLP at DeepSeek-V3 shapes, against the bf16
Triton kernels, bf16 `torch._grouped_mm` and one dense FP8 GEMM of the same FLOPs
(`torch._scaled_mm` with tensor-wise scales, i.e. without the fine-grained scaling). Operands are
quantized beforehand (quantization is timed by fp8_quant.py).

    python benchmarks/kernels/fp8_grouped_gemm.py [--experts 8 32 256] [--json out.json]   # GPU, sm_89+
    python benchmarks/kernels/fp8_grouped_gemm.py --check                                  # CPU
"""
import itertools

import torch
from triton_bench import Case, max_rel_error, parse_args, routed_counts, run


def cases(args, device, out_dtype):
    for E in args.experts:
        yield from _cases(args, E, device, out_dtype)


def _colmajor(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _cases(args, E, device, out_dtype) -> list[Case]:
    from dsv3.kernels import reference as ref
    from dsv3.kernels import triton as tk
    quantize = ref.quantize if args.check else tk.quantize  # the twin's quantizer keeps --check independent
    H, I = args.hidden, args.inter
    counts = routed_counts(args.tokens, args.topk, args.total_experts, E, align=args.align)
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    M = sum(counts)
    g = torch.Generator(device=device).manual_seed(E)
    r = lambda *s, scale=1.0: (torch.randn(*s, device=device, generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    x, dy, h, gate_up, d_gate_up = r(M, H), r(M, H), r(M, I), r(M, 2 * I), r(M, 2 * I)
    w13, w2 = r(E, 2 * I, H, scale=H ** -0.5), r(E, H, I, scale=I ** -0.5)
    rows = {n: quantize(t, "1x128") for n, t in dict(x=x, dy=dy, h=h, d_gate_up=d_gate_up).items()}
    cols = {n: quantize(t, "128x1") for n, t in dict(x=x, dy=dy, h=h, d_gate_up=d_gate_up).items()}
    w13q, w2q = quantize(w13, "128x128"), quantize(w2, "128x128")
    one = torch.ones((), device=device)
    # tol: the same E4M3 products and scales on both sides, summed in another order (fp32 out), plus
    # one bf16 rounding (bf16 out).
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[out_dtype]
    meta = dict(experts=E, rows=M, out=str(out_dtype).removeprefix("torch."))
    out = []

    def dense_fp8(a, b):  # a [m, k] row-major, b [k, n] column-major, as torch._scaled_mm wants them
        return lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)

    def case(op, flops, impls, twin):
        if args.check:
            impls = {"triton fp8": impls["triton fp8"]}
        out.append(Case(op, f"E={E} M={M}", impls, flops=flops, twin=twin, compare=max_rel_error(tol), meta=meta))

    case("gate_up + SwiGLU", 2 * M * H * 2 * I, {
        "triton fp8": lambda: tk.gate_up_swiglu(rows["x"], w13q, offs, out_dtype),
        "triton bf16": lambda: tk.gate_up_swiglu(x, w13, offs),
        "torch._grouped_mm bf16": lambda: ref.swiglu(torch._grouped_mm(x, w13.mT, offs=offs)),
        "dense fp8 _scaled_mm": dense_fp8(rows["x"].data, w13q.data[0].t()),
    }, lambda: ref.gate_up_swiglu(rows["x"], w13q, offs, out_dtype))
    case("down", 2 * M * I * H, {
        "triton fp8": lambda: tk.grouped_linear(rows["h"], w2q, offs, out_dtype),
        "triton bf16": lambda: tk.grouped_linear(h, w2, offs),
        "torch._grouped_mm bf16": lambda: torch._grouped_mm(h, w2.mT, offs=offs),
        "dense fp8 _scaled_mm": dense_fp8(rows["h"].data, w2q.data[0].t()),
    }, lambda: ref.grouped_linear(rows["h"], w2q, offs, out_dtype))
    case("down dgrad + SwiGLU backward", 2 * M * H * I, {
        "triton fp8": lambda: tk.swiglu_dgrad(rows["dy"], w2q, gate_up, offs, out_dtype),
        "triton bf16": lambda: tk.swiglu_dgrad(dy, w2, gate_up, offs),
        "torch._grouped_mm bf16": lambda: ref.swiglu_backward(gate_up, torch._grouped_mm(dy, w2, offs=offs)),
        "dense fp8 _scaled_mm": dense_fp8(rows["dy"].data, _colmajor(w2q.data[0])),
    }, lambda: ref.swiglu_dgrad(rows["dy"], w2q, gate_up, offs, out_dtype))
    case("gate_up dgrad", 2 * M * 2 * I * H, {
        "triton fp8": lambda: tk.grouped_linear_dgrad(rows["d_gate_up"], w13q, offs, out_dtype),
        "triton bf16": lambda: tk.grouped_linear_dgrad(d_gate_up, w13, offs),
        "torch._grouped_mm bf16": lambda: torch._grouped_mm(d_gate_up, w13, offs=offs),
        "dense fp8 _scaled_mm": dense_fp8(rows["d_gate_up"].data, _colmajor(w13q.data[0])),
    }, lambda: ref.grouped_linear_dgrad(rows["d_gate_up"], w13q, offs, out_dtype))
    case("down wgrad", 2 * M * H * I, {
        "triton fp8": lambda: tk.grouped_linear_wgrad(cols["dy"], cols["h"], offs, torch.float32),
        "triton bf16": lambda: tk.grouped_linear_wgrad(dy, h, offs, torch.float32),
        "torch._grouped_mm bf16": lambda: torch._grouped_mm(dy.t().contiguous(), h, offs=offs),
        "dense fp8 _scaled_mm": dense_fp8(cols["dy"].data.t(), cols["h"].data),
    }, lambda: ref.grouped_linear_wgrad(cols["dy"], cols["h"], offs, torch.float32))
    case("gate_up wgrad", 2 * M * 2 * I * H, {
        "triton fp8": lambda: tk.grouped_linear_wgrad(cols["d_gate_up"], cols["x"], offs, torch.float32),
        "triton bf16": lambda: tk.grouped_linear_wgrad(d_gate_up, x, offs, torch.float32),
        "torch._grouped_mm bf16": lambda: torch._grouped_mm(d_gate_up.t().contiguous(), x, offs=offs),
        "dense fp8 _scaled_mm": dense_fp8(cols["d_gate_up"].data.t(), cols["x"].data),
    }, lambda: ref.grouped_linear_wgrad(cols["d_gate_up"], cols["x"], offs, torch.float32))
    return out


def main() -> int:
    args = parse_args(__doc__)
    if args.check:
        cpu = torch.device("cpu")
        return run(itertools.chain(cases(args, cpu, torch.float32), cases(args, cpu, torch.bfloat16)), args,
                   "FP8 grouped GEMMs vs dequantize-then-matmul (Triton interpreter, CPU)")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("fp8_grouped_gemm.py times FP8 kernels on an sm_89+ GPU; on CPU run it with --check")
    return run(cases(args, torch.device("cuda"), torch.bfloat16), args,
               "FP8 grouped GEMMs (median of do_bench), outputs bf16 (wgrad fp32)")


if __name__ == "__main__":
    raise SystemExit(main())
