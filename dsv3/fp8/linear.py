"""An nn.Linear whose three GEMMs run in FP8 (V3 report §3.3, Figure 6).

    Fprop  y  = x  @ W^T     x: 1x128 tiles along K      W: 128x128 blocks
    Dgrad  dx = dy @ W       dy: 1x128 tiles along N     W: the same blocks (square, so either way round)
    Wgrad  dW = dy^T @ x     dy, x: 128x1 tiles along the tokens (the K of this GEMM)

A dense linear is the grouped GEMM of the kernel library with one expert. Backward keeps x only in
FP8 (data + 1x128 scales, ~1.03 bytes per element instead of 4) and re-tiles it to 128x1 for Wgrad;
it also keeps the FP8 weight blocks, so the weight is quantized once per forward. The master weight
and its gradient stay fp32; y and dx come out in x's dtype.
"""
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dsv3.fp8.recipe import Fp8Recipe
from dsv3.kernels.fp8_format import Fp8Tensor
from dsv3.kernels.ops import autocast_operands


def one_expert(rows: torch.Tensor) -> torch.Tensor:
    """Grouped-GEMM offsets putting all `rows` in a single expert."""
    return torch.full((1,), rows.shape[0], dtype=torch.int32, device=rows.device)


class Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, recipe: Fp8Recipe, role: str):
        k = recipe.backend
        offsets = one_expert(x)
        with torch.autocast(x.device.type, enabled=False):
            xq = recipe.quantize(x, "1x128", role)
            wq = recipe.quantize(weight.unsqueeze(0), "128x128", "weight")
            y = k.grouped_linear(xq, wq, offsets, x.dtype)
        ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale, offsets)
        ctx.recipe, ctx.role, ctx.dtypes = recipe, role, (x.dtype, weight.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_data, x_scale, w_data, w_scale, offsets = ctx.saved_tensors
        recipe, k, (x_dtype, w_dtype) = ctx.recipe, ctx.recipe.backend, ctx.dtypes
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = k.grouped_linear_dgrad(recipe.quantize(dy, "1x128", "act_grad"), Fp8Tensor(w_data, w_scale),
                                            offsets, x_dtype)
            if ctx.needs_input_grad[1]:
                x_cols = recipe.to_columns(Fp8Tensor(x_data, x_scale), ctx.role)
                dw = k.grouped_linear_wgrad(recipe.quantize(dy, "128x1", "act_grad"), x_cols, offsets,
                                            torch.float32)[0].to(w_dtype)
        return dx, dw, None, None


class Fp8Linear(nn.Linear):
    """Drop-in for an nn.Linear: the same `weight` (and `bias`) Parameter objects, so names, shapes,
    state dicts and checkpoints are unchanged; only the GEMMs differ. `role` says which tensor its
    input is (see `recipe.ROLES`): `attn_out` for MLA's `wo`, `linear_in` elsewhere."""

    def __init__(self, linear: nn.Linear, recipe: Fp8Recipe, role: str = "linear_in"):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate fresh weights
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.recipe, self.role = recipe, role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under a GPU run's autocast the FP8 GEMMs take BF16 inputs and give BF16 outputs, as the
        # report's recipe does; the master weight stays fp32 (autocast does not reach this Function).
        (rows,) = autocast_operands(x.reshape(-1, self.in_features))
        y = Fp8LinearFunction.apply(rows, self.weight, self.recipe, self.role)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias  # the bias add stays in high precision

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 role={self.role}"
