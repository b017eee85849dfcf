"""The kernel entry points the model calls; each picks an implementation by name.

Implementations of the grouped expert GEMMs:
- "torch": `torch._grouped_mm` (one call per GEMM, no host sync; fast on CPU and on sm_90+).
- "reference": the per-expert loop of `reference.py` (for tests).
"""
import torch

from dsv3.kernels import reference

GROUPED_GEMM_IMPLS = ("auto", "torch", "reference")


def resolve_grouped_gemm_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map `kernels.grouped_gemm` to a concrete implementation, or fail naming the allowed values."""
    if impl not in GROUPED_GEMM_IMPLS:
        raise ValueError(f"kernels.grouped_gemm={impl!r} is not one of {GROUPED_GEMM_IMPLS}")
    if impl == "auto":
        return "torch"
    return impl


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
    if impl == "reference":
        return reference.grouped_linear(x, w, offsets)
    raise ValueError(f"grouped_linear: unknown implementation {impl!r}")


def expert_swiglu_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
                      impl: str = "torch") -> torch.Tensor:
    """All routed experts on the expert-major rows `x`: down(silu(gate(x)) * up(x))."""
    if impl == "reference":
        return reference.expert_swiglu_mlp(x, w13, w2, offsets)
    h = reference.swiglu(grouped_linear(x, w13, offsets, impl))
    return grouped_linear(h, w2, offsets, impl)
