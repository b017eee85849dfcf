"""Expert parallelism: the token dispatcher that exchanges (token, expert) rows between the ranks of an
EP group, so that every rank runs only its own contiguous slice of the routed experts (docs/architecture.md, section 4).

    dispatch: layout (csrc)  ->  counts exchange  ->  rows to the ranks of their experts (FP8 with the
              FP8 recipe), with their local expert ids  ->  regroup expert-major, padded per expert
    experts:  the MoE runs its local experts on (rows, offsets), unaware of the exchange
    combine:  expert outputs back to their tokens' ranks, in the order each source expects them
              ->  out[t] = sum_k w[t, k] * y[t, k] (csrc combine, fp32 accumulation)

The exchanges go through a transport (`ep_transport.py`, `parallel.ep_transport`): the library
all-to-all, or the intranode direct transport whose kernels write the rows straight into the
destination's memory. Both run the same kernels and deliver the same bytes, so the results do not
depend on the transport, and they are bit-identical run to run (every step is a gather with a
precomputed inverse, and rows arrive in a fixed order).

Autograd: dispatch and combine are Functions whose backward is the reverse exchange; the backward of
dispatch is a combine-like reduction sent back to the token's rank, the backward of combine a
dispatch-like gather of the output gradient. Every rank of the group must call dispatch/combine (and
hence backward) the same number of times, in the same order: the model's layers do, since every rank
runs the same graph.

Asynchronous use (the F&B overlap): `dispatch_issue` / `combine_issue` start an exchange and return
at once; `dispatch_wait` / `combine_wait` finish it. `dispatch` and `combine` are issue + wait.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.kernels import dispatch as kernels
from dsv3.kernels.fp8_format import TILE
from dsv3.kernels.fp8_format import Fp8Tensor, attach_fp8
from dsv3.parallel.ep_transport import AllToAllTransport, Gather, GatherFp8, Reduce, Splits, Transport


def dequantize_1x128(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = q * scale per 1x128 tile along the hidden dim (the last tile may be narrower)."""
    full = scales.repeat_interleave(TILE, dim=1)
    return (q.float() * full[:, :q.shape[1]]).to(dtype)


@dataclass
class _State:
    """What combine (and dispatch's backward) needs from dispatch."""

    layout: kernels.DispatchLayout      # the send side: where each token and (token, k) entry went
    tokens: Splits                      # rows of the dispatch exchange
    pairs: Splits                       # (token, k) entries each rank sent each rank: the combine returns them
    back: torch.Tensor | None = None           # [P_recv] expert-major row of each return row, in source order
    back_inverse: torch.Tensor | None = None   # [rows, 1] its inverse (padding rows: -1)
    em_token_row: torch.Tensor | None = None   # [recv rows, E_local] expert-major rows of each received row


@dataclass
class PendingDispatch:
    """A dispatch between `dispatch_issue` and `dispatch_wait`."""

    x: torch.Tensor
    state: _State
    exchange: object                    # the transport's pending exchange
    offsets: torch.Tensor | None = None
    fp8_rows: Fp8Tensor | None = None


@dataclass
class PendingCombine:
    """A combine between `combine_issue` and `combine_wait`."""

    y: torch.Tensor
    weights: torch.Tensor
    state: _State
    exchange: object


class _DispatchRows(torch.autograd.Function):
    """x -> the expert-major rows this rank's experts get (forward: finish the exchange and regroup;
    backward: reduce the rows' gradients per received row, send them back, reduce per token)."""

    @staticmethod
    def forward(ctx, x, pending: PendingDispatch, d: "ExpertParallelDispatcher"):
        received = d.transport.wait(pending.exchange)
        recv_topk = received[-1]
        # Regroup expert-major with one "rank" per local expert (module doc of dsv3/kernels/dispatch.py).
        em = kernels.dispatch_layout(recv_topk, d.n_local, d.n_local, align=d.align)
        src, offsets = em.send_token, em.rank_offsets
        if src.numel() == 0:
            # torch._grouped_mm's backward rejects zero rows: give the last expert one zero row instead.
            src = torch.full((1,), -1, dtype=src.dtype, device=src.device)
            offsets = torch.zeros_like(offsets)
            offsets[-1] = 1
        if d.fp8:
            q, scales = received[0], received[1]
            rows = kernels.gather_rows(dequantize_1x128(q, scales, x.dtype), src)
            # The same regrouping of the FP8 data and scales (byte copies; padding rows: zeros).
            pending.fp8_rows = Fp8Tensor(kernels.gather_rows(q, src), kernels.gather_rows(scales, src))
        else:
            rows = kernels.gather_rows(received[0], src)
        st = pending.state
        st.back = em.pair_row[recv_topk >= 0]  # (source, row, k) order: what each source expects back, in order
        st.back_inverse = kernels.invert_index(st.back, rows.shape[0]).unsqueeze(1)
        st.em_token_row = em.token_row
        d.transport.release(pending.exchange)  # every read of the received rows is done
        pending.offsets = offsets.to(torch.int32)
        ctx.state, ctx.d = st, d
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        d, st = ctx.d, ctx.state
        # FP8 recipe: the token gradients return in BF16 (this is a combine: DeepSeek-V3 §3.3.3).
        wire = torch.bfloat16 if d.fp8 else None
        ex = d.transport.issue([Reduce(grad_rows.contiguous(), st.em_token_row, wire)], st.tokens.reversed())
        (grad_send,) = d.transport.wait(ex)
        dx = kernels.permute_backward(grad_send, st.layout.token_row)  # fp32 accumulation inside
        d.transport.release(ex)
        return dx.to(grad_rows.dtype), None, None


class _CombineRows(torch.autograd.Function):
    """(y, weights) -> out[t] = sum_k w[t, k] * y[t, k] (forward: finish the exchange that brought the
    expert outputs back and reduce them; backward: dw here, dy sent back to the experts' ranks)."""

    @staticmethod
    def forward(ctx, y, weights, pending: PendingCombine, d: "ExpertParallelDispatcher"):
        (y_back,) = d.transport.wait(pending.exchange)
        lay = pending.state.layout
        out = kernels.extension().combine(y_back, lay.pair_pos, weights, y.dtype)
        # dw needs the returned rows in backward; a direct transport's are a view of its receive slot.
        saved = None
        if ctx.needs_input_grad[1]:
            saved = y_back if d.transport.kind == AllToAllTransport.kind else y_back.clone()
        d.transport.release(pending.exchange)
        ctx.save_for_backward(saved, weights)
        ctx.state, ctx.d, ctx.y_dtype = pending.state, d, y.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        y_back, weights = ctx.saved_tensors
        d, st = ctx.d, ctx.state
        grad = grad.contiguous()
        lay = st.layout
        dw = kernels.extension().combine_weight_grad(grad, y_back, lay.pair_pos) if ctx.needs_input_grad[1] else None
        dy = None
        if ctx.needs_input_grad[0]:
            src, scale = kernels.combine_grad_rows(lay.pair_src, lay.pair_pos.shape[1], weights)
            ex = d.transport.issue([Gather(grad, src, scale, y_back.dtype)], st.pairs)
            (dy_ret,) = d.transport.wait(ex)
            dy = kernels.extension().combine(dy_ret, st.back_inverse, None, ctx.y_dtype)  # a permute's backward
            d.transport.release(ex)
        return dy, dw, None, None


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
    `transport`: how rows move (`ep_transport.py`); the all-to-all over `group` by default. Every
    dispatcher of the group's layers shares one (its exchanges are numbered).
    """

    def __init__(self, group, n_experts: int, align: int = 1, fp8: bool = False, transport: Transport | None = None):
        self.group = group
        self.n_ranks = dist.get_world_size(group)
        if n_experts % self.n_ranks:
            raise ValueError(f"ExpertParallelDispatcher: the EP group's {self.n_ranks} ranks must divide the "
                             f"{n_experts} experts")
        if align < 1:
            raise ValueError(f"ExpertParallelDispatcher: align={align} must be >= 1")
        self.n_experts, self.n_local = n_experts, n_experts // self.n_ranks
        self.align, self.fp8 = align, fp8
        self.transport = transport if transport is not None else AllToAllTransport(group)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor):
        """x [T, dim], indices [T, K] global expert ids -> (rows expert-major for the local experts,
        offsets [E_local] int32 cumulative ends, state for combine)."""
        return self.dispatch_wait(self.dispatch_issue(x, indices))

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state: _State) -> torch.Tensor:
        """y [rows, dim] expert outputs in dispatch's row order, weights [T, K] fp32 -> [T, dim]."""
        return self.combine_wait(self.combine_issue(y, weights, state))

    def dispatch_issue(self, x: torch.Tensor, indices: torch.Tensor) -> PendingDispatch:
        """Start dispatching: layout, counts (a short synchronous exchange: every rank must know what
        it receives), then the rows are on their way. Finish with `dispatch_wait`."""
        layout = kernels.dispatch_layout(indices, self.n_experts, self.n_ranks)
        # Tokens and (token, k) entries per destination: sizes for the dispatch and for the combine.
        tokens, pairs = self.transport.exchange_counts(
            torch.stack([layout.tokens_per_rank, layout.pairs_per_rank], dim=1))
        xd = x.detach()
        rows = GatherFp8(xd, layout.send_token) if self.fp8 else Gather(xd, layout.send_token)
        # Each row's local experts (-1 elsewhere): the routing the receiver regroups by.
        topk = Gather(layout.send_topk, torch.arange(layout.send_topk.shape[0], device=x.device))
        exchange = self.transport.issue([rows, topk], tokens)
        return PendingDispatch(x, _State(layout, tokens, pairs), exchange)

    def dispatch_wait(self, pending: PendingDispatch):
        """-> (rows expert-major, offsets [E_local] int32, state for combine), as `dispatch`."""
        rows = _DispatchRows.apply(pending.x, pending, self)
        pending.x = pending.exchange = None  # done: hold no tensor longer than autograd does
        if pending.fp8_rows is not None:
            attach_fp8(rows, pending.fp8_rows)
        return rows, pending.offsets, pending.state

    def combine_issue(self, y: torch.Tensor, weights: torch.Tensor, state: _State) -> PendingCombine:
        """Start sending the expert outputs back to their tokens' ranks. Finish with `combine_wait`."""
        # Combine in BF16 with the FP8 recipe (DeepSeek-V3 §3.3.3), forward and backward.
        wire = torch.bfloat16 if self.fp8 else None
        exchange = self.transport.issue([Gather(y.detach(), state.back, dtype=wire)], state.pairs.reversed())
        return PendingCombine(y, weights, state, exchange)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        """-> [T, dim], as `combine`."""
        out = _CombineRows.apply(pending.y, pending.weights, pending, self)
        pending.y = pending.weights = pending.exchange = None  # done: hold no tensor longer than autograd does
        return out
