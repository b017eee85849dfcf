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

    @property
    def options(self) -> dict:
        # FP fusion (a*b+c -> fma) pinned on: Triton 3.9 warns that its default will flip.
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=True)

    def run(self):
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](**self.args, **self.options)
        return self.outputs[0] if len(self.outputs) == 1 else self.outputs

