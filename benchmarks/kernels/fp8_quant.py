"""Benchmark of the FP8 quantization kernels (1x128 activations, 128x1 wgrad operands, 128x128
weights, re-tiling 1x128 -> 128x1, dequantization) against their plain-PyTorch twins, at the
routed-expert shapes of DeepSeek-V3. Rates are GB/s of minimum traffic (inputs read once, data and
scales written once).

    python benchmarks/kernels/fp8_quant.py [--experts 8 32 256] [--json out.json]   # GPU
    python benchmarks/kernels/fp8_quant.py --check                                  # CPU
"""
import torch
from triton_bench import Case, max_rel_error, parse_args, routed_counts, run


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cases(args, device):
    for E in args.experts:
        yield from _cases(args, E, device)


def _cases(args, E, device) -> list[Case]:
    from dsv3.kernels import reference as ref
    from dsv3.kernels import triton as tk
    H, I = args.hidden, args.inter
    M = sum(routed_counts(args.tokens, args.topk, args.total_experts, E, align=args.align))
    g = torch.Generator(device=device).manual_seed(E)
    x = (torch.randn(M, H, device=device, generator=g) * 3).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) * H ** -0.5).to(torch.bfloat16)
    xq, wq = ref.quantize(x, "1x128"), ref.quantize(w13, "128x128")
    meta = dict(experts=E)
    # Quantization is exact arithmetic (one IEEE division, round to nearest even): bit-identical
    # (tolerance 0). Dequantization to bf16: one rounding, which the interpreter truncates: 2^-7.
    exact, bf16_step = max_rel_error(0.0), max_rel_error(2 ** -7)
    rows_out = _nbytes(xq.data, xq.scale)
    w_out = _nbytes(wq.data, wq.scale)
    spec = [
        ("quantize 1x128", f"[{M}, {H}]", _nbytes(x) + rows_out,
         lambda m: lambda: m.quantize(x, "1x128"), exact),
        ("quantize 1x128 pow2", f"[{M}, {H}]", _nbytes(x) + rows_out,
         lambda m: lambda: m.quantize(x, "1x128", pow2_scales=True), exact),
        ("quantize 128x1", f"[{M}, {H}]", _nbytes(x) + rows_out,
         lambda m: lambda: m.quantize(x, "128x1"), exact),
        ("quantize 128x128", f"[{E}, {2 * I}, {H}]", _nbytes(w13) + w_out,
         lambda m: lambda: m.quantize(w13, "128x128"), exact),
        ("requantize 1x128 -> 128x1", f"[{M}, {H}]", 2 * rows_out,
         lambda m: lambda: m.requantize(xq, "1x128", "128x1"), exact),
        ("dequantize 1x128 -> bf16", f"[{M}, {H}]", rows_out + _nbytes(x),
         lambda m: lambda: m.dequantize(xq, "1x128", torch.bfloat16), bf16_step),
        ("dequantize 128x128 -> bf16", f"[{E}, {2 * I}, {H}]", w_out + _nbytes(w13),
         lambda m: lambda: m.dequantize(wq, "128x128", torch.bfloat16), bf16_step),
    ]
    out = []
    for op, shape, nbytes, make, compare in spec:
        impls = {"triton": make(tk)} if args.check else {"triton": make(tk), "torch (twin)": make(ref)}
        out.append(Case(op, shape, impls, nbytes=nbytes, twin=make(ref), compare=compare, meta=meta))
    return out


def main() -> int:
    args = parse_args(__doc__)
    if args.check:
        return run(cases(args, torch.device("cpu")), args, "FP8 quantization vs twins (Triton interpreter, CPU)")
    if not torch.cuda.is_available():
        raise SystemExit("fp8_quant.py times kernels on a GPU; on CPU run it with --check")
    return run(cases(args, torch.device("cuda")), args, "FP8 quantization (median of do_bench)")


if __name__ == "__main__":
    raise SystemExit(main())
