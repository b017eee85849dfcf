"""Plain-PyTorch twins of the dispatch/combine kernels in `dispatch.py` (same names, same semantics).

Slow and obvious on purpose: loops over ranks and top-k slots, autograd from torch's own indexing
ops rather than from the inverse indices, so the tests compare two independent derivations. Where
the kernels promise bit-exact results (layouts, row movement, FP8 quantization, combine with fp32
accumulation in slot order) the twins compute the same roundings in the same order.
"""
from __future__ import annotations

import torch

from dsv3.kernels.dispatch import DispatchLayout
from dsv3.kernels.fp8_format import DEFAULT_AMAX_FLOOR as AMAX_FLOOR
from dsv3.kernels.fp8_format import FP8_MAX
from dsv3.kernels.fp8_format import TILE as QUANT_GROUP


def _check_topk(topk_idx: torch.Tensor, n_experts: int, n_ranks: int) -> None:
    if n_ranks < 1 or n_experts % n_ranks:
        raise ValueError(f"dispatch_layout: n_ranks must be >= 1 and divide n_experts={n_experts}, got {n_ranks}")
    bad = (topk_idx < -1) | (topk_idx >= n_experts)
    if bad.any():
        t, j = bad.nonzero()[0].tolist()
        raise ValueError(f"dispatch_layout: topk_idx[{t}, {j}] = {topk_idx[t, j].item()} is not an expert id")
    ids = topk_idx.sort(1).values
    repeated = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    if repeated.any():
        t = repeated.any(1).nonzero()[0].item()
        raise ValueError(f"dispatch_layout: topk_idx[{t}] names an expert twice: {topk_idx[t].tolist()}")


def dispatch_layout(topk_idx: torch.Tensor, n_experts: int, n_ranks: int, align: int = 1,
                    chunk: int = 64) -> DispatchLayout:
    """Rank by rank: the tokens that need it in token order, then the entries on it in (t, k) order."""
    del chunk  # a speed knob of the kernel
    _check_topk(topk_idx, n_experts, n_ranks)
    n_tokens, k = topk_idx.shape
    epr = n_experts // n_ranks
    valid = topk_idx >= 0
    rank_of = torch.where(valid, torch.div(topk_idx, epr, rounding_mode="floor"), -1)
    long = dict(dtype=torch.long, device=topk_idx.device)

    tokens_per_expert = torch.bincount(topk_idx[valid], minlength=n_experts)
    token_in_rank = torch.stack([(rank_of == r).any(1) for r in range(n_ranks)], 1)
    tokens_per_rank = token_in_rank.sum(0)
    padded = (tokens_per_rank + align - 1) // align * align
    rank_offsets = padded.cumsum(0)
    pairs_per_rank = torch.stack([(rank_of == r).sum() for r in range(n_ranks)])
    pair_offsets = pairs_per_rank.cumsum(0)

    token_row = torch.full((n_tokens, n_ranks), -1, **long)
    send_token = torch.full((int(padded.sum()),), -1, **long)
    send_topk = torch.full((int(padded.sum()), k), -1, **long)
    pair_row = torch.full((n_tokens, k), -1, **long)
    pair_pos = torch.full((n_tokens, k), -1, **long)
    pair_src = torch.empty(int(pairs_per_rank.sum()), **long)
    for r in range(n_ranks):
        start = int(rank_offsets[r] - padded[r])
        tokens = token_in_rank[:, r].nonzero().flatten()
        rows = start + torch.arange(len(tokens), **long)
        token_row[tokens, r] = rows
        send_token[rows] = tokens
        mine = rank_of[tokens] == r
        send_topk[rows] = torch.where(mine, topk_idx[tokens] - r * epr, -1)
        flat = (rank_of == r).flatten().nonzero().flatten()  # (t, k) row-major
        pstart = int(pair_offsets[r] - pairs_per_rank[r])
        pair_pos.view(-1)[flat] = pstart + torch.arange(len(flat), **long)
        pair_src[pstart:pstart + len(flat)] = flat
        pair_row.view(-1)[flat] = token_row[torch.div(flat, k, rounding_mode="floor"), r]
    return DispatchLayout(tokens_per_expert, tokens_per_rank, token_in_rank, token_row, send_token, send_topk,
                          rank_offsets, pair_row, pairs_per_rank, pair_pos, pair_src, pair_offsets)


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] with -1 giving a zero row; differentiable through torch's indexing."""
    with_zero_row = torch.cat([x.new_zeros(1, x.shape[1]), x])
    return with_zero_row[rows + 1]


def gather_rows(x: torch.Tensor, src_row: torch.Tensor, row_scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out_dtype = out_dtype or x.dtype
    if row_scale is None and out_dtype == x.dtype:
        return _take_rows(x, src_row)
    v = _take_rows(x, src_row).float()
    if row_scale is not None:
        v = row_scale.unsqueeze(1) * v
    return v.to(out_dtype)


def permute(x: torch.Tensor, src_row: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    del inverse  # torch derives the backward of the indexing itself
    return _take_rows(x, src_row)


def pow2_scales(amax: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(max(amax, floor) / 448)). fp64 makes amax / 448 exact enough to compare with a
    power of two: an fp32 amax sits either exactly on 448 * 2^j or at least 2^-24 relatively away,
    far above fp64's rounding; frexp then reads the exponent exactly (mantissa 0.5: exact power)."""
    m, e = torch.frexp(amax.clamp_min(AMAX_FLOOR).double() / FP8_MAX)
    return torch.ldexp(torch.ones_like(m), e - (m == 0.5).to(e.dtype)).float()


def quantize_fp8_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 in 1x128 tiles along the last dim (last tile may be narrower), power-of-two scales."""
    rows, h = x.shape
    groups = -(-h // QUANT_GROUP)
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, groups * QUANT_GROUP - h))  # zeros leave amax unchanged
    scales = pow2_scales(padded.view(rows, groups, QUANT_GROUP).abs().amax(-1)) if groups else xf.new_empty(rows, 0)
    full = scales.repeat_interleave(QUANT_GROUP, dim=1)[:, :h]
    return (xf / full).to(torch.float8_e4m3fn), scales


def permute_fp8(x: torch.Tensor, src_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_1x128(_take_rows(x, src_row))


def combine(y: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    del inverse
    acc = torch.zeros(index.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(index.shape[1]):
        rows = index[:, j]
        term = _take_rows(y, rows).float()
        if weights is not None:
            term = weights[:, j:j + 1] * term
        acc = torch.where((rows >= 0).unsqueeze(1), acc + term, acc)
    return acc.to(out_dtype or y.dtype)


def combine_weight_grad(grad: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    prod = grad.float().unsqueeze(1) * _take_rows(y, index.reshape(-1)).float().view(*index.shape, -1)
    return prod.sum(-1)


def permute_backward(grad: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return combine(grad, inverse, None)


def combine_backward(grad: torch.Tensor, y: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scatter form, the transpose of combine written directly: dy[index[t, j]] = w[t, j] * grad[t]."""
    del inverse
    dy = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    valid = index >= 0
    t, j = valid.nonzero(as_tuple=True)
    w = weights[t, j].unsqueeze(1) if weights is not None else 1.0
    dy[index[t, j]] = w * grad[t].float()
    dw = None if weights is None else combine_weight_grad(grad, y, index)
    return dy.to(y.dtype), dw


def invert_index(index: torch.Tensor, n_rows: int) -> torch.Tensor:
    flat = index.reshape(-1)
    entries = (flat >= 0).nonzero().flatten()
    if ((flat < -1) | (flat >= n_rows)).any():
        raise ValueError(f"invert_index: an entry is outside [-1, {n_rows})")
    if torch.bincount(flat[entries], minlength=n_rows).gt(1).any():
        raise ValueError("invert_index: a row is named by more than one entry")
    inverse = torch.full((n_rows,), -1, dtype=torch.long, device=index.device)
    inverse[flat[entries]] = entries
    return inverse
