"""How a Triton kernel gets launched here: interpreter or GPU, which config row, and a launch record
that the AOT checker can compile for any architecture without a GPU.

Triton fixes interpreter vs compiler when `triton` is imported (`TRITON_INTERPRET=1` at import turns
every `@triton.jit` function, its own standard library included, into Python), so "interpreting"
means: this process imported triton in that mode. Setting the variable later has no effect.
"""
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from dsv3.kernels.triton.configs import INTERPRETER, arch_of


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter in this process."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_probe, InterpretedFunction)


def arch_for(t: torch.Tensor) -> str:
    """Config row for launching on `t`'s device: the interpreter's, or the CUDA device's arch."""
    if interpreting():
        return INTERPRETER
    if t.device.type != "cuda":
        raise RuntimeError(f"Triton kernels need CUDA tensors (got a {t.device.type} tensor); on CPU they run only "
                           f"in the interpreter: start Python with TRITON_INTERPRET=1")
    return arch_of(t.device)


@dataclass
class Launch:
    """One kernel launch: `kernel[grid](**args, num_warps=, num_stages=)`. `args` holds every kernel
    argument by name, constexprs included, so the AOT checker can rebuild the exact signature."""
    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    num_warps: int
    num_stages: int
    outputs: tuple = field(default_factory=tuple)

    def run(self):
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)
        return self.outputs[0] if len(self.outputs) == 1 else self.outputs


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float8_e4m3fn: tl.float8e4nv}[dtype]


def upcast_in_kernel(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 arithmetic and dots wrongly (no numpy bf16): widen after loading."""
    return dtype == torch.bfloat16 and interpreting()
