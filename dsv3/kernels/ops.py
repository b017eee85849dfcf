"""The kernel entry points the model calls; each picks an implementation by name.

Implementations of the grouped expert GEMMs (config key `kernels.grouped_gemm`):
- "triton": the Triton kernels of `dsv3/kernels/triton` (fp16/bf16; FP8 on sm_89+). CUDA sm_80+, or
  CPU inside Triton's interpreter (TRITON_INTERPRET=1 set before Python starts; for tests).
- "torch": `torch._grouped_mm` (one call per GEMM, no host sync; fast on CPU). No FP8. Refused on CUDA:
  its weight-gradient form (groups along K) hits a device-side assert unless every expert's row count
  is a multiple of 8 (seen with torch 2.11 on an H200), and routed row counts are arbitrary.
- "reference": the per-expert loop of `reference.py` (for tests; for FP8 the dequantize-then-matmul
  emulation, which is how the FP8 recipe runs on CPU).
- "auto": triton on CUDA sm_80+ (FP8: sm_89+; fp32 activations get IEEE fp32 dot products), torch on
  CPU (FP8: reference). On a GPU where Triton cannot run, the reference loop, with a WARNING that
  says so and why.
Asking for an implementation the device cannot run is an error, never a silent fallback.
"""
import logging
import os

import torch

from dsv3.kernels import reference
from dsv3.kernels.experts import ExpertSwiGLUFunction, GroupedLinearFunction
from dsv3.kernels.fp8_format import FP8_MIN_CAPABILITY

GROUPED_GEMM_IMPLS = ("auto", "triton", "torch", "reference")
FP8_GROUPED_GEMM_IMPLS = ("auto", "triton", "reference")
log = logging.getLogger("dsv3")


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _triton_problem(device: torch.device, dtype: torch.dtype, fp8: bool) -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    try:
        from dsv3.kernels.triton import interpreting
    except ImportError as exc:
        return f"the triton package is not importable ({exc})"
    if not fp8 and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activations of dtype {dtype} (accepted: float16, bfloat16, float32)"
    if interpreting():
        return None
    if device.type != "cuda":
        hint = (" (TRITON_INTERPRET=1 was set after triton had been imported; set it before Python starts)"
                if os.environ.get("TRITON_INTERPRET") == "1" else "")
        return (f"device {device} is not CUDA; on CPU the Triton kernels run only in Triton's interpreter, "
                f"with TRITON_INTERPRET=1 set before Python starts{hint}")
    cap = _capability(device)
    if cap < (8, 0):
        # Not sm_75 either: Triton (3.9) compiles these kernels for Turing without tensor cores (no HMMA in
        # the SASS) and with thousands of spill stores; there the per-expert cuBLAS loop is the fast path.
        return f"{device} has compute capability {cap[0]}.{cap[1]}; the Triton grouped GEMMs need 8.0 or newer"
    if fp8 and cap < FP8_MIN_CAPABILITY:
        return f"{device} has compute capability {cap[0]}.{cap[1]}; FP8 tensor cores need 8.9 (Ada) or newer"
    return None


def resolve_grouped_gemm_impl(impl: str, device: torch.device | str, dtype: torch.dtype, fp8: bool = False) -> str:
    """Map `kernels.grouped_gemm` to a concrete implementation for `device` and activation `dtype`
    (fp8=True: the FP8 recipe's expert GEMMs), or fail naming the option and the allowed values."""
    allowed = FP8_GROUPED_GEMM_IMPLS if fp8 else GROUPED_GEMM_IMPLS
    what = "kernels.grouped_gemm" + (" with FP8 experts" if fp8 else "")
    if impl not in allowed:
        raise ValueError(f"{what}={impl!r} is not one of {allowed}")
    device = torch.device(device)
    if impl == "auto":
        if device.type != "cuda":
            return "reference" if fp8 else "torch"
        cap = _capability(device)
        if fp8 and cap < FP8_MIN_CAPABILITY:
            raise ValueError(f"{what}='auto': {device} has compute capability {cap[0]}.{cap[1]}, FP8 GEMMs "
                             f"need 8.9 (Ada) or newer; train in bf16 on this GPU")
        problem = _triton_problem(device, dtype, fp8)
        if problem is None:
            return "triton"
        log.warning("%s='auto': the Triton kernels cannot run here (%s); the routed experts run on the per-expert "
                    "'reference' loop instead (correct, several times slower)", what, problem)
        return "reference"
    if impl == "torch" and device.type == "cuda":
        raise ValueError(f"{what}='torch' cannot run on CUDA: torch._grouped_mm's weight gradient (groups along K) "
                         f"asserts on the device unless every expert's row count is a multiple of 8, and routed "
                         f"row counts are arbitrary. Use 'auto' or 'triton' (sm_80+), or 'reference'. "
                         f"Allowed values: {allowed}")
    if impl == "triton":
        problem = _triton_problem(device, dtype, fp8)
        if problem is not None:
            raise ValueError(f"{what}='triton' cannot run here: {problem}. Allowed values: {allowed}")
    return impl


def _triton_backend():
    from dsv3.kernels import triton as triton_kernels
    return triton_kernels


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward
    rejects the expanded/strided gradients that reductions such as `.sum()` produce."""

    @staticmethod
    def forward(ctx, y):
        return y

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _torch_grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets))


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e].T for every expert e in one call; differentiable."""
    if impl == "torch":
        return _torch_grouped_linear(x, w, offsets)
    if impl == "triton":
        return GroupedLinearFunction.apply(x, w, offsets, _triton_backend())
    if impl == "reference":
        return reference.grouped_linear(x, w, offsets)
    raise ValueError(f"grouped_linear: unknown implementation {impl!r} (resolved ones: triton, torch, reference)")


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on for their device, else unchanged.

    Autocast intercepts aten ops only; the experts' custom autograd Functions (and the Triton kernels
    behind them) are out of its reach, so a bf16 run would otherwise hand them the fp32 residual
    stream and fp32 master weights: IEEE fp32 dot products, no tensor cores. The casts are autograd
    ops, so gradients still reach the fp32 masters in fp32."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def expert_swiglu_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
                      impl: str = "torch") -> torch.Tensor:
    """All routed experts on the expert-major rows `x`: down(silu(gate(x)) * up(x)), in the autocast
    dtype when autocast is on (see `autocast_operands`)."""
    x, w13, w2 = autocast_operands(x, w13, w2)
    if impl == "reference":
        return reference.expert_swiglu_mlp(x, w13, w2, offsets)
    if impl == "triton":
        return ExpertSwiGLUFunction.apply(x, w13, w2, offsets, _triton_backend())
    h = reference.swiglu(grouped_linear(x, w13, offsets, impl))
    return grouped_linear(h, w2, offsets, impl)
