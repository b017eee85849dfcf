"""Autograd functions of the routed experts, written once over a *backend*: a module with the
grouped-kernel API (`grouped_linear`, `grouped_linear_dgrad`, `grouped_linear_wgrad`,
`gate_up_swiglu`, `swiglu_dgrad`, `quantize`, `requantize`). `dsv3.kernels.triton` is the fast
backend, `dsv3.kernels.reference` its plain-PyTorch twin (and the FP8 emulation on CPU).

What backward keeps (report §3.3.3, recomputation of SwiGLU): the expert input x and the gate/up
projection [M, 2I]; h = silu(gate) * up is not stored but recomputed by the dgrad epilogue, which
needs gate_up anyway. Weight gradients are accumulated in fp32 inside the kernels and returned in
the weights' dtype.
"""
import torch
from torch.autograd.function import once_differentiable

from dsv3.kernels.fp8_format import Fp8Tensor


class GroupedLinearFunction(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T with the backend's forward/dgrad/wgrad kernels."""

    @staticmethod
    def forward(ctx, x, w, offsets, backend):
        ctx.save_for_backward(x, w, offsets)
        ctx.backend = backend
        return backend.grouped_linear(x, w, offsets)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dx = ctx.backend.grouped_linear_dgrad(dy, w, offsets) if ctx.needs_input_grad[0] else None
        dw = ctx.backend.grouped_linear_wgrad(dy, x, offsets, w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class ExpertSwiGLUFunction(torch.autograd.Function):
    """down(silu(x w_gate^T) * (x w_up^T)) per expert: 2 forward GEMMs, 4 backward GEMMs, SwiGLU
    and its backward fused into GEMM epilogues."""

    @staticmethod
    def forward(ctx, x, w13, w2, offsets, backend):
        h, gate_up = backend.gate_up_swiglu(x, w13, offsets, save_gate_up=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(x, w13, w2, offsets, gate_up)
        ctx.backend = backend
        return backend.grouped_linear(h, w2, offsets)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w13, w2, offsets, gate_up = ctx.saved_tensors
        k, need = ctx.backend, ctx.needs_input_grad
        d_gate_up, h = k.swiglu_dgrad(dy, w2, gate_up, offsets)
        dw2 = k.grouped_linear_wgrad(dy, h, offsets, w2.dtype) if need[2] else None
        dx = k.grouped_linear_dgrad(d_gate_up, w13, offsets) if need[0] else None
        dw13 = k.grouped_linear_wgrad(d_gate_up, x, offsets, w13.dtype) if need[1] else None
        return dx, dw13, dw2, None, None


class ExpertSwiGLUFP8Function(torch.autograd.Function):
    """The same MLP with every GEMM in FP8 (Fprop, Dgrad, Wgrad; report §3.3): activations and their
    gradients quantized in 1x128 tiles for Fprop/Dgrad and 128x1 for Wgrad, weights in 128x128
    blocks (quantized from the high-precision masters on every call), fp32 accumulation promoted
    every 128 of K, outputs in x's dtype. x is kept for backward in FP8 (1x128) and re-tiled to
    128x1 for the wgrad of w13, as the report caches MoE inputs in FP8."""

    @staticmethod
    def forward(ctx, x, w13, w2, offsets, backend, pow2_scales, amax_floor):
        k = backend
        q = dict(pow2_scales=pow2_scales, amax_floor=amax_floor)
        xq = k.quantize(x, "1x128", **q)
        w13q, w2q = k.quantize(w13, "128x128", **q), k.quantize(w2, "128x128", **q)
        h, gate_up = k.gate_up_swiglu(xq, w13q, offsets, x.dtype, save_gate_up=any(ctx.needs_input_grad[:3]))
        y = k.grouped_linear(k.quantize(h, "1x128", **q), w2q, offsets, x.dtype)
        ctx.save_for_backward(xq.data, xq.scale, w13q.data, w13q.scale, w2q.data, w2q.scale, gate_up, offsets)
        ctx.backend, ctx.q, ctx.dtypes = backend, q, (x.dtype, w13.dtype, w2.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_data, x_scale, w13_data, w13_scale, w2_data, w2_scale, gate_up, offsets = ctx.saved_tensors
        k, q, need = ctx.backend, ctx.q, ctx.needs_input_grad
        x_dtype, w13_dtype, w2_dtype = ctx.dtypes
        w13q, w2q = Fp8Tensor(w13_data, w13_scale), Fp8Tensor(w2_data, w2_scale)
        d_gate_up, h = k.swiglu_dgrad(k.quantize(dy, "1x128", **q), w2q, gate_up, offsets, x_dtype)
        dx = dw13 = dw2 = None
        if need[2]:
            dw2 = k.grouped_linear_wgrad(k.quantize(dy, "128x1", **q), k.quantize(h, "128x1", **q), offsets,
                                         torch.float32).to(w2_dtype)
        if need[0]:
            dx = k.grouped_linear_dgrad(k.quantize(d_gate_up, "1x128", **q), w13q, offsets, x_dtype)
        if need[1]:
            x_cols = k.requantize(Fp8Tensor(x_data, x_scale), "1x128", "128x1", **q)
            dw13 = k.grouped_linear_wgrad(k.quantize(d_gate_up, "128x1", **q), x_cols, offsets,
                                          torch.float32).to(w13_dtype)
        return dx, dw13, dw2, None, None, None, None

