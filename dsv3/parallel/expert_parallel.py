"""Expert parallelism: the token dispatcher that exchanges (token, expert) rows between the ranks of an
EP group, so that every rank runs only its own contiguous slice of the routed experts (docs/architecture.md, section 4).

    dispatch: layout (csrc)  ->  send buffer (permute, or FP8 permute)  ->  counts, then rows
              (all_to_all_single, uneven splits)  ->  regroup expert-major, padded per expert
    experts:  the MoE runs its local experts on (rows, offsets), unaware of the exchange
    combine:  un-pad (gather the rows each source expects back)  ->  rows back (all_to_all_single)
              ->  out[t] = sum_k w[t, k] * y[t, k] (csrc combine, fp32 accumulation)

Every step is a gather with a precomputed inverse and the exchanges move rows in a fixed order, so
results are bit-identical run to run. Autograd: each exchange is a Function whose backward is the
reverse exchange; the backward of dispatch is a combine and vice versa. Every rank of the group must
call dispatch/combine (and hence backward) the same number of times, in the same order: the model's
layers do, since every rank runs the same graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.kernels import dispatch as kernels
from dsv3.kernels.fp8_format import TILE
from dsv3.kernels.fp8_format import Fp8Tensor, attach_fp8


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single of the rows of `x`: in_splits[r] rows go to rank r, out_splits[r] come from it."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """Differentiable row exchange: the gradient goes back along the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def dequantize_1x128(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = q * scale per 1x128 tile along the hidden dim (the last tile may be narrower)."""
    full = scales.repeat_interleave(TILE, dim=1)
    return (q.float() * full[:, :q.shape[1]]).to(dtype)


class _Fp8Dispatch(torch.autograd.Function):
    """Send buffer and exchange with the rows in FP8 E4M3 (1x128 tiles, power-of-2 scales), dequantized
    on receipt (DeepSeek-V3 §3.3: dispatch in FP8). The gradient returns unquantized, in BF16 (the
    report's BF16 combine: this backward is one), through the reverse exchange and the permute backward:
    quantization is treated as the identity (straight-through).
    Returns (dequantized rows, FP8 data, scales); the last two are not differentiable."""

    @staticmethod
    def forward(ctx, x, send_token, token_row, out_splits, in_splits, group):
        q, scales = kernels.permute_fp8(x, send_token)
        # As bytes: collectives do not all take float8 (gloo does not).
        q = exchange(q.view(torch.uint8), out_splits, in_splits, group).view(torch.float8_e4m3fn)
        scales = exchange(scales, out_splits, in_splits, group)
        ctx.save_for_backward(token_row)
        ctx.splits, ctx.group = (out_splits, in_splits), group
        ctx.mark_non_differentiable(q, scales)
        return dequantize_1x128(q, scales, x.dtype), q, scales

    @staticmethod
    def backward(ctx, grad, grad_q, grad_scales):
        (token_row,) = ctx.saved_tensors
        out_splits, in_splits = ctx.splits
        grad_send = exchange(grad.to(torch.bfloat16), in_splits, out_splits, ctx.group)
        dx = kernels.permute_backward(grad_send, token_row).to(grad.dtype)  # fp32 accumulation inside
        return dx, None, None, None, None, None


@dataclass
class _State:
    """What combine needs from dispatch."""

    layout: kernels.DispatchLayout      # the send side: where each token and (token, k) entry went
    back: torch.Tensor                  # [P_recv] expert-major row of each return row, in source order
    back_inverse: torch.Tensor          # [rows, 1] its inverse (padding rows: -1)
    pairs_sent: list[int]               # entries this rank sent to each rank (rows it gets back)
    pairs_received: list[int]           # entries each rank sent here (rows it returns to each)


class ExpertParallelDispatcher:
    """Dispatcher over an EP process group of R ranks; rank r holds experts r*E/R .. (r+1)*E/R - 1.

    `align`: every local expert's rows are padded with zero rows to a multiple of this (the grouped
    GEMM's row alignment, e.g. 128 for DeepGEMM's contiguous layout; 1 on CPU). Padding rows give zero
    outputs and zero weight gradients and are never sent back.
    `fp8`: send the dispatched rows in FP8 with 1x128 power-of-2 scales (the FP8 recipe switches it
    on). The experts get the dequantized rows, with the received FP8 rows attached
    (`fp8_format.attach_fp8`): FP8 experts compute on those directly, without quantizing again. The
    expert outputs go back in BF16 (the report's BF16 combine; accumulation stays fp32) and so does
    their gradient.
    """

    def __init__(self, group, n_experts: int, align: int = 1, fp8: bool = False):
        self.group = group
        self.n_ranks = dist.get_world_size(group)
        if n_experts % self.n_ranks:
            raise ValueError(f"ExpertParallelDispatcher: the EP group's {self.n_ranks} ranks must divide the "
                             f"{n_experts} experts")
        if align < 1:
            raise ValueError(f"ExpertParallelDispatcher: align={align} must be >= 1")
        self.n_experts, self.n_local = n_experts, n_experts // self.n_ranks
        self.align, self.fp8 = align, fp8

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor):
        """x [T, dim], indices [T, K] global expert ids -> (rows expert-major for the local experts,
        offsets [E_local] int32 cumulative ends, state for combine)."""
        layout = kernels.dispatch_layout(indices, self.n_experts, self.n_ranks)
        # Counts first (tokens and entries per destination), so every rank can size its receive buffers.
        counts = torch.stack([layout.tokens_per_rank, layout.pairs_per_rank], dim=1)
        received = exchange(counts, [1] * self.n_ranks, [1] * self.n_ranks, self.group)
        send_rows, pairs_sent = layout.tokens_per_rank.tolist(), layout.pairs_per_rank.tolist()
        recv_rows, pairs_received = received[:, 0].tolist(), received[:, 1].tolist()

        recv_q = None
        if self.fp8:
            recv_x, recv_q, recv_s = _Fp8Dispatch.apply(x, layout.send_token, layout.token_row, recv_rows, send_rows,
                                                        self.group)
        else:
            send_x = kernels.permute(x, layout.send_token, layout.token_row)
            recv_x = _Exchange.apply(send_x, recv_rows, send_rows, self.group)
        # Each row's local experts (-1 elsewhere): the routing the receiver regroups by.
        recv_topk = exchange(layout.send_topk, recv_rows, send_rows, self.group)

        # Regroup expert-major with one "rank" per local expert (module doc of dsv3/kernels/dispatch.py).
        em = kernels.dispatch_layout(recv_topk, self.n_local, self.n_local, align=self.align)
        src, offsets = em.send_token, em.rank_offsets
        if src.numel() == 0:
            # torch._grouped_mm's backward rejects zero rows: give the last expert one zero row instead.
            src = torch.full((1,), -1, dtype=src.dtype, device=src.device)
            offsets = torch.zeros_like(offsets)
            offsets[-1] = 1
        rows = kernels.permute(recv_x, src, em.token_row)
        if recv_q is not None:  # the same regrouping of the FP8 data and scales (byte copies; padding: zeros)
            attach_fp8(rows, Fp8Tensor(kernels.gather_rows(recv_q, src), kernels.gather_rows(recv_s, src)))
        back = em.pair_row[recv_topk >= 0]  # (source, row, k) order: what each source expects back, in order
        back_inverse = kernels.invert_index(back, rows.shape[0]).unsqueeze(1)
        return rows, offsets.to(torch.int32), _State(layout, back, back_inverse, pairs_sent, pairs_received)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state: _State) -> torch.Tensor:
        """y [rows, dim] expert outputs in dispatch's row order, weights [T, K] fp32 -> [T, dim]."""
        y_ret = kernels.permute(y, state.back, state.back_inverse)
        if self.fp8:
            y_ret = y_ret.to(torch.bfloat16)  # combine in BF16 (DeepSeek-V3 §3.3.3), forward and backward
        y_back = _Exchange.apply(y_ret, state.pairs_sent, state.pairs_received, self.group)
        lay = state.layout
        return kernels.combine(y_back, lay.pair_pos, lay.pair_src, weights, out_dtype=y.dtype)
