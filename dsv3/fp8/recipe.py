"""What the FP8 modules share: the kernel backend, and which tensors get power-of-two scales.

A *role* names what a quantized tensor is in the network, so that `precision.fp8.pow2_scales` can pick
the tensors the V3 report rounds to powers of two (§3.3.3): the input of the linear after attention
(`attn_out`), the dispatched expert input (`expert_in`) and the gradient before the experts' down
projection (`expert_out_grad`). A power-of-two scale makes re-tiling a cached 1x128 tile to 128x1
for Wgrad exact (only a change of exponent), which is why the report uses it where that happens.
"""
from dataclasses import dataclass
from types import ModuleType

import torch

from dsv3.kernels import reference
from dsv3.kernels.fp8_format import DEFAULT_AMAX_FLOOR, Fp8Tensor

ROLES = ("attn_out", "expert_in", "expert_out_grad", "swiglu_in", "linear_in", "act_grad", "weight")
FP8_IMPLS = ("reference", "triton")


@dataclass(frozen=True)
class Fp8Recipe:
    """The quantization choices of one run. `backend` is `dsv3.kernels.reference` (emulation:
    dequantize, then fp32 matmul) or `dsv3.kernels.triton` (E4M3 tensor cores); both have the same API."""

    backend: ModuleType = reference
    pow2_roles: frozenset = frozenset(("attn_out", "expert_in", "expert_out_grad"))
    amax_floor: float = DEFAULT_AMAX_FLOOR

    def __post_init__(self):
        assert set(self.pow2_roles) <= set(ROLES), self.pow2_roles  # validated: dsv3/fp8/config_rules.py

    @property
    def emulated(self) -> bool:
        return self.backend is reference

    def quantize(self, x: torch.Tensor, tiling: str, role: str) -> Fp8Tensor:
        return self.backend.quantize(x, tiling, pow2_scales=role in self.pow2_roles, amax_floor=self.amax_floor)

    def to_columns(self, t: Fp8Tensor, role: str) -> Fp8Tensor:
        """Cached 1x128 row tiles -> the 128x1 column tiles of a Wgrad operand."""
        return self.backend.requantize(t, "1x128", "128x1", pow2_scales=role in self.pow2_roles,
                                       amax_floor=self.amax_floor)


def backend_for(impl: str) -> ModuleType:
    """The kernel module of a resolved FP8 implementation (see `dsv3.kernels.ops.resolve_grouped_gemm_impl`)."""
    assert impl in FP8_IMPLS, impl  # resolved by resolve_grouped_gemm_impl(..., fp8=True)
    if impl == "triton":
        from dsv3.kernels import triton as triton_kernels
        return triton_kernels
    return reference


def describe(recipe: Fp8Recipe, device: torch.device) -> str:
    """One log line saying which path computes the FP8 GEMMs."""
    if recipe.emulated:
        return (f"EMULATED on {device}: quantize to E4M3 -> dequantize -> fp32 matmul (the numerics of an FP8 "
                f"GEMM with fp32 accumulation; slower than fp32, no FP8 tensor cores)")
    where = str(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where += f" (sm_{major}{minor})"
    elif device.type == "cpu":
        where += " (Triton interpreter)"
    return f"Triton E4M3 kernels on {where}"

