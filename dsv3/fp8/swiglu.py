"""SwiGLU FFNs in FP8: the routed experts (grouped), the shared experts and the dense FFNs (one group).

    gate_up = x @ W13^T  (SwiGLU fused into the epilogue)  ->  h = silu(gate) * up  ->  y = h @ W2^T

All six GEMMs (2 Fprop, 2 Dgrad, 2 Wgrad) run in FP8. What backward keeps (report §3.3.3): the input
x in FP8 (1x128; re-tiled to 128x1 for the W13 Wgrad) and the SwiGLU input gate_up in FP8 (1x128);
h is not stored but recomputed from the dequantized gate_up by the dgrad epilogue. The report also
caches the SwiGLU input of the MoE in FP8; we do the same for the dense FFNs, whose SwiGLU is the same.

The routed experts' input may already be FP8: an FP8 dispatch attaches the FP8 rows it received to
the dequantized rows it hands over (`fp8_format.attached_fp8`), and they are used as they are.
"""
import torch
from torch.autograd.function import once_differentiable

from dsv3.fp8.linear import one_expert
from dsv3.fp8.recipe import Fp8Recipe
from dsv3.kernels.fp8_format import Fp8Tensor, attached_fp8, check_fp8
from dsv3.kernels.ops import autocast_operands
from dsv3.model.moe import Experts, FeedForward


class Fp8SwiGLUFunction(torch.autograd.Function):
    """down(silu(x w_gate^T) * (x w_up^T)) per expert, every GEMM in FP8. `x_role` / `grad_role` name
    x and the output gradient for the recipe's power-of-two choice; `x_fp8`: x already quantized
    (1x128), or None."""

    @staticmethod
    def forward(ctx, x, w13, w2, offsets, recipe: Fp8Recipe, x_role: str, grad_role: str, x_fp8):
        k = recipe.backend
        with torch.autocast(x.device.type, enabled=False):
            xq = x_fp8 if x_fp8 is not None else recipe.quantize(x, "1x128", x_role)
            w13q, w2q = recipe.quantize(w13, "128x128", "weight"), recipe.quantize(w2, "128x128", "weight")
            backward = any(ctx.needs_input_grad[:3])  # False in evaluation: nothing to cache
            h, gate_up = k.gate_up_swiglu(xq, w13q, offsets, x.dtype, save_gate_up=backward)
            y = k.grouped_linear(recipe.quantize(h, "1x128", "linear_in"), w2q, offsets, x.dtype)
            if not backward:
                return y
            gate_up = recipe.quantize(gate_up, "1x128", "swiglu_in")
        ctx.save_for_backward(xq.data, xq.scale, w13q.data, w13q.scale, w2q.data, w2q.scale, gate_up.data,
                              gate_up.scale, offsets)
        ctx.recipe, ctx.roles, ctx.dtypes = recipe, (x_role, grad_role), (x.dtype, w13.dtype, w2.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_data, x_scale, w13_data, w13_scale, w2_data, w2_scale, gu_data, gu_scale, offsets = ctx.saved_tensors
        recipe, k, need = ctx.recipe, ctx.recipe.backend, ctx.needs_input_grad
        (x_role, grad_role), (x_dtype, w13_dtype, w2_dtype) = ctx.roles, ctx.dtypes
        q = recipe.quantize
        dx = dw13 = dw2 = None
        with torch.autocast(dy.device.type, enabled=False):
            gate_up = k.dequantize(Fp8Tensor(gu_data, gu_scale), "1x128", x_dtype)
            d_gate_up, h = k.swiglu_dgrad(q(dy, "1x128", grad_role), Fp8Tensor(w2_data, w2_scale), gate_up, offsets,
                                          x_dtype)
            if need[2]:
                dw2 = k.grouped_linear_wgrad(q(dy, "128x1", grad_role), q(h, "128x1", "linear_in"), offsets,
                                             torch.float32).to(w2_dtype)
            if need[0]:
                dx = k.grouped_linear_dgrad(q(d_gate_up, "1x128", "act_grad"), Fp8Tensor(w13_data, w13_scale),
                                            offsets, x_dtype)
            if need[1]:
                x_cols = recipe.to_columns(Fp8Tensor(x_data, x_scale), x_role)
                dw13 = k.grouped_linear_wgrad(q(d_gate_up, "128x1", "act_grad"), x_cols, offsets,
                                              torch.float32).to(w13_dtype)
        return dx, dw13, dw2, None, None, None, None, None


class Fp8Experts(Experts):
    """The routed experts with FP8 GEMMs; the same `w13`/`w2` Parameters (an expert-parallel plan may
    replace them by slices before or after the swap: they are read at every call)."""

    def __init__(self, experts: Experts, recipe: Fp8Recipe):
        torch.nn.Module.__init__(self)  # not Experts': it would allocate fresh weights
        self.w13, self.w2 = experts.w13, experts.w2
        self.impl, self.expert_offset = experts.impl, experts.expert_offset
        self.recipe = recipe

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        x_fp8 = attached_fp8(x)  # read before the cast below, which would make a new tensor without it
        if x_fp8 is not None:
            check_fp8(x_fp8, "1x128", "the FP8 rows attached to the expert input")
        (x,) = autocast_operands(x)  # outputs in BF16 under a GPU run's autocast (the masters stay fp32)
        return Fp8SwiGLUFunction.apply(x, self.w13, self.w2, offsets, self.recipe, "expert_in", "expert_out_grad",
                                       x_fp8)

    def extra_repr(self) -> str:
        return f"experts={self.w13.shape[0]}, fp8"


class Fp8FeedForward(FeedForward):
    """A dense or shared-expert SwiGLU FFN as one FP8 expert: the same `w1`/`w2`/`w3` linears (names and
    Parameters unchanged); [w1; w3] is concatenated at every call into the fused gate/up weight."""

    def __init__(self, ffn: FeedForward, recipe: Fp8Recipe):
        torch.nn.Module.__init__(self)
        self.w1, self.w2, self.w3 = ffn.w1, ffn.w2, ffn.w3
        self.recipe = recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (rows,) = autocast_operands(x.reshape(-1, x.shape[-1]))
        w13 = torch.cat([self.w1.weight, self.w3.weight]).unsqueeze(0)
        y = Fp8SwiGLUFunction.apply(rows, w13, self.w2.weight.unsqueeze(0), one_expert(rows), self.recipe,
                                    "linear_in", "act_grad", None)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return "fp8"
