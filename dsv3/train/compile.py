"""`train.compile=true`: torch.compile the model's regions of fixed shape, in place.

Compiled: every MLA (projections, norms, RoPE, attention), every SwiGLU FeedForward (dense FFNs and the
shared experts) and every other RMSNorm. `nn.Module.compile` swaps the module's call for the compiled
one and keeps the module, so parameter names, state dicts, checkpoints and the parallel plans are
unchanged. Left eager: the MoE router, the token dispatch and the grouped expert GEMMs (their shapes
depend on the routing, the expert-parallel dispatch talks to other ranks, and torch._grouped_mm's
shape function accepts only BF16), the output head with its loss, and the FP8 recipe's modules.
"""
from torch import nn

from dsv3.model.mla import MLA
from dsv3.model.moe import FeedForward
from dsv3.model.norm import RMSNorm

COMPILED = (MLA, FeedForward, RMSNorm)


def compile_regions(model: nn.Module) -> int:
    """Compile every module of a COMPILED type that is not inside another one; returns how many. The
    first forward of each region (and of each new input shape) pays the compilation."""
    done: list[str] = []
    for name, module in model.named_modules():
        if type(module) in COMPILED and not any(name.startswith(d + ".") for d in done):
            module.compile()
            done.append(name)
    return len(done)
