"""Expert-parallel dispatch/combine on the `csrc/` kernels (extension module `dsv3._dispatch_ext`).

T tokens, top-K routing `topk_idx [T, K]` (int64 expert ids, -1 for an unused slot), E experts split
evenly and contiguously over R ranks: rank r owns experts r*E/R .. (r+1)*E/R - 1 (docs/architecture.md, section 4).

Send buffer (dispatch), built by `permute(x, layout.send_token, layout.token_row)`:
  rows grouped by destination rank, rank r's segment ending at `rank_offsets[r]` and padded up to a
  multiple of `align` with zero rows; inside a segment, the tokens that need rank r in increasing
  token order, each exactly once however many of its experts live on r.
Return buffer (what comes back after the experts): one row per routed entry (t, k), grouped by rank
  (segment ends `pair_offsets[r]`), inside a rank by (t, k) row-major.
  `combine(y_back, layout.pair_pos, layout.pair_src, topk_weights)` reduces it to [T, H].

Receiving side: the rows from each source arrive in the source's token order, with `send_topk` (the
row's experts local to this rank, -1 elsewhere). The same layout with one "rank" per local expert
regroups them expert-major, and its `pair_row` lists the rows the source expects back, in order:
    em = dispatch_layout(recv_topk, n_local_experts, n_local_experts, align=gemm_alignment)
    x_em = permute(recv_x, em.send_token, em.token_row)        # expert e: rows ..em.rank_offsets[e]
    y_em = experts(x_em, em.rank_offsets.int())               # grouped-GEMM offsets
    back = em.pair_row[recv_topk >= 0]                         # (source, row, k) order
    y_ret = permute(y_em, back, invert_index(back, y_em.shape[0]).unsqueeze(1))
tests/csrc/test_ep_roundtrip.py runs this whole path for several simulated ranks.

Every op is a gather; a scatter (a backward) is a gather through the inverse index the layout returns
beside each forward index. No output element is written twice and atomics only count, so results are
bit-identical run to run and independent of the thread count. `dispatch_reference.py` holds the
plain-PyTorch twin of every function here.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

_BUILD_HINT = ("build it from the repository root with `pip install --no-build-isolation -e .` "
               "(torch must be installed first: pip install torch==2.13.0)")


def extension() -> ModuleType:
    """The compiled kernels; a clear error if they were not built."""
    try:
        from dsv3 import _dispatch_ext
    except ImportError as err:
        raise ImportError(f"dsv3._dispatch_ext (the csrc/ dispatch/combine kernels) is not importable: {err}; "
                          f"{_BUILD_HINT}") from err
    return _dispatch_ext


@dataclass(frozen=True)
class DispatchLayout:
    """Where every token and every routed (token, k) entry goes. int64 unless noted; -1 = none."""

    tokens_per_expert: torch.Tensor  # [E] routed entries per expert
    tokens_per_rank: torch.Tensor    # [R] distinct tokens per rank (a token counts once per rank)
    token_in_rank: torch.Tensor      # [T, R] bool
    token_row: torch.Tensor          # [T, R] send-buffer row holding token t for rank r, or -1
    send_token: torch.Tensor         # [S] token of each send row, -1 for padding rows
    send_topk: torch.Tensor          # [S, K] the row's experts local to its rank (id - r*E/R), else -1
    rank_offsets: torch.Tensor       # [R] cumulative ends of the (padded) send segments; S = [-1]
    pair_row: torch.Tensor           # [T, K] send row carrying entry (t, k), or -1
    pairs_per_rank: torch.Tensor     # [R] routed entries per rank (rows it returns)
    pair_pos: torch.Tensor           # [T, K] return row of entry (t, k), or -1
    pair_src: torch.Tensor           # [P] flat t*K + k of each return row (inverse of pair_pos)
    pair_offsets: torch.Tensor       # [R] cumulative ends of the return segments; P = [-1]


def dispatch_layout(topk_idx: torch.Tensor, n_experts: int, n_ranks: int, align: int = 1,
                    chunk: int = 64) -> DispatchLayout:
    """Counting-sort layout of `topk_idx` by destination rank (deterministic, see the module doc).

    Raises on ids outside [-1, n_experts) and on an expert repeated within a token's row. `align`
    pads every rank's send segment (use the grouped GEMM's row alignment on the receiving side).
    `chunk` (tokens per counting-sort chunk) changes the speed only, never the result. One host sync
    (the output sizes)."""
    return DispatchLayout(*extension().layout(topk_idx, n_experts, n_ranks, align, chunk))


def gather_rows(x: torch.Tensor, src_row: torch.Tensor, row_scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[m] = row_scale[m] * x[src_row[m]] (-1: a zero row), converted through fp32 to `out_dtype`.

    Without scale and dtype change it is a byte copy, so it accepts any dtype (FP8 rows, their scale
    rows); otherwise x and out are float32/bfloat16/float16. Not differentiable (see `permute`)."""
    return extension().gather_rows(x, src_row, row_scale, out_dtype)


def permute_fp8(x: torch.Tensor, src_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather rows and quantize them to FP8 E4M3 in 1x128 tiles along the hidden dim (the last tile
    may be narrower): returns (q [M, H] float8_e4m3fn, scales [M, ceil(H/128)] float32) with
    x ≈ q * scale. Scales are powers of two, 2^ceil(log2(max(amax, 1e-4) / 448)) (DeepSeek-V3's FP8
    dispatch). Padding rows (src -1) are zeros. Not differentiable: the gradient of a dispatched
    activation flows back in BF16 through `permute_backward`."""
    q, scales = extension().gather_rows_fp8(x, src_row)
    return q, scales


def permute_backward(grad: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Backward of `permute`: dx[n] = sum_j grad[inverse[n, j]] (fp32 accumulation, in order j)."""
    return extension().combine(grad, inverse, None, None)


def combine_backward(grad: torch.Tensor, y: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of `combine`: (dy, dw) with dy[m] = w[t, j] * grad[t] for (t, j) = inverse[m] (zero
    where inverse is -1), in y's dtype; dw[t, j] = <grad[t], y[index[t, j]]> in fp32 (None without
    weights)."""
    dw = None if weights is None else extension().combine_weight_grad(grad, y, index)
    return _combine_dy(grad, y, index, inverse, weights), dw


def combine_grad_rows(inverse: torch.Tensor, j: int, weights: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward of `combine` as a gather: dy[m] = scale[m] * grad[src[m]], (src, scale) from the
    inverse index (src -1 where inverse is -1; scale None without weights)."""
    if j == 0:  # no entries: every inverse is -1
        return inverse, None
    src = torch.div(inverse, j, rounding_mode="floor")  # -1 stays -1
    scale = None if weights is None else weights.reshape(-1)[inverse.clamp(min=0)]
    return src, scale


def _combine_dy(grad, y, index, inverse, weights):
    src, scale = combine_grad_rows(inverse, index.shape[1], weights)
    return extension().gather_rows(grad, src, scale, y.dtype)


def invert_index(index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """inverse [n_rows] with inverse[index.flatten()[e]] = e, -1 for rows no entry names. Raises if
    two entries name one row (such an index has no inverse) or an entry is outside [-1, n_rows)."""
    return extension().invert_index(index, n_rows)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src_row, inverse):
        ctx.save_for_backward(inverse)
        return extension().gather_rows(x, src_row, None, None)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return permute_backward(grad, inverse), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, index, inverse, out_dtype):
        ctx.save_for_backward(y, weights, index, inverse)
        return extension().combine(y, index, weights, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        y, weights, index, inverse = ctx.saved_tensors
        grad = grad.contiguous()
        dy = _combine_dy(grad, y, index, inverse, weights) if ctx.needs_input_grad[0] else None
        dw = extension().combine_weight_grad(grad, y, index) if ctx.needs_input_grad[1] else None
        return dy, dw, None, None, None


def permute(x: torch.Tensor, src_row: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """out[m] = x[src_row[m]] (-1: a zero row); differentiable in x. `inverse [N, J]` lists, for
    every row n of x, the out rows that read it (-1 padded): for the send buffer `layout.token_row`."""
    _check_rows(x, inverse, "permute", "x", "inverse")
    return _Permute.apply(x, src_row, inverse)


def combine(y: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[index[t, j]] (unit weights if None; -1 entries skipped),
    accumulated in fp32 in order j and written in `out_dtype` (default y's). Differentiable in y and
    weights (float32). `inverse [M]` is the flat (t*J + j) reading each row of y, -1 if none: for
    the return buffer `layout.pair_src`."""
    _check_rows(y, inverse, "combine", "y", "inverse")
    return _Combine.apply(y, weights, index, inverse, out_dtype)


def _check_rows(x: torch.Tensor, inverse: torch.Tensor, op: str, xname: str, iname: str) -> None:
    if inverse.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: {iname} has {inverse.shape[0]} rows but {xname} has {x.shape[0]}; the inverse "
                         f"index names, for every row of {xname}, the entries that read it")
