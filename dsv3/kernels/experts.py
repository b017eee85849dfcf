"""Autograd functions of the routed experts in high precision, written once over a *backend*: a module
with the grouped-kernel API (`grouped_linear`, `grouped_linear_dgrad`, `grouped_linear_wgrad`,
`gate_up_swiglu`, `swiglu_dgrad`). `dsv3.kernels.triton` is the fast backend, `dsv3.kernels.reference`
its plain-PyTorch twin. The FP8 version of the expert MLP is the FP8 recipe's (`dsv3.fp8.swiglu`),
over the same backends.

What backward keeps (report §3.3.3, recomputation of SwiGLU): the expert input x and the gate/up
projection [M, 2I]; h = silu(gate) * up is not stored but recomputed by the dgrad epilogue, which
needs gate_up anyway. Weight gradients are accumulated in fp32 inside the kernels and returned in
the weights' dtype.
"""
import torch
from torch.autograd.function import once_differentiable


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
