"""Triton bodies of the grouped GEMMs on the contiguous expert-major layout (see `reference.py`).

Two kernels cover forward, dgrad and wgrad, 16-bit and FP8:
- `m_grouped_gemm`: C[rows of e] = A[rows of e] @ B_e, B_e a strided [K, N] view of expert e's
  weight (forward: W_e^T, dgrad: W_e). Epilogues: none, SwiGLU (gate and up accumulated side by
  side, h = silu(gate) * up written once) and SwiGLU-backward (d_gate_up and the recomputed h).
- `k_grouped_gemm`: dW_e = dY_e^T X_e, the reduction running over expert e's rows.

FP8 (E4M3) operands carry per-tile scales; block K is 128 so that every K step multiplies the
fresh partial product by its A and B scales and adds it to the fp32 accumulator: the report's
promotion interval of 128 (tensor-core FP8 accumulation keeps only ~14 bits, §3.3.2).
"""
import triton
import triton.language as tl


@triton.jit
def _row_bound(offsets_ptr, idx, mask, M):
    """offsets[idx] clamped to [0, M]: offsets that break the contract (offsets[-1] == M, non-decreasing)
    give wrong rows but never an access outside the tensors (checking them would need a host sync)."""
    return tl.minimum(tl.maximum(tl.load(offsets_ptr + idx, mask=mask, other=0), 0), M)


@triton.jit
def _expert_of_tile(offsets_ptr, tile_m, E, M, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row of the tile, end row of the expert) of row tile `tile_m`; expert >= E when
    the tile is past the last one.

    Tiles are numbered expert by expert, ceil(rows_e / BLOCK_M) each. The map is rebuilt by every
    program from `offsets` (E_POW2 int32 loads, a cumsum and a sum: negligible next to a GEMM tile)
    instead of by a separate kernel or on the host, so no launch waits for a host sync and the grid
    is a static upper bound of the tile count (at most E - 1 programs exit at once).
    """
    e_idx = tl.arange(0, E_POW2)
    ends = _row_bound(offsets_ptr, e_idx, e_idx < E, M)
    starts = _row_bound(offsets_ptr, e_idx - 1, (e_idx > 0) & (e_idx < E), M)
    tiles = (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, 0)
    e = tl.sum((tile_ends <= tile_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(e_idx < e, tiles, 0), 0)
    e_ok = e < E
    start = _row_bound(offsets_ptr, e - 1, e_ok & (e > 0), M)
    end = _row_bound(offsets_ptr, e, e_ok, M)
    return e, start + (tile_m - first_tile) * BLOCK_M, end


@triton.jit
def m_grouped_gemm(
        a_ptr, b_ptr, c_ptr, offsets_ptr,
        a_scale_ptr, b_scale_ptr,  # FP8 only: A 1x128 [M, ceil(K/128)]; B 128x128, read through strides
        aux_ptr, aux_out_ptr,  # SWIGLU: gate_up out (or None); DSWIGLU: gate_up in, h out
        M, N, K, E, grid_m,
        stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bse, stride_bsk, stride_bsn,
        stride_xm, stride_xn, stride_ym, stride_yn,
        EPILOGUE: tl.constexpr,  # 0: C = AB; 1: SwiGLU (N = I, B has 2I columns); 2: SwiGLU backward
        FP8: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, E_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    tl.static_assert(not FP8 or BLOCK_K == 128, "FP8 promotes partial sums every 128 of K: BLOCK_K must be 128")
    # Swizzle: GROUP_M consecutive row tiles (mostly the same expert) share each weight tile in L2.
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    tile_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    e, row0, row_end = _expert_of_tile(offsets_ptr, tile_m, E, M, E_POW2, BLOCK_M)
    if e >= E:
        return
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < row_end
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    e64 = e.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + e64 * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    if FP8:
        bs_ptrs = b_scale_ptr + e64 * stride_bse
    if EPILOGUE == 1:
        b2_ptrs = b_ptrs + N * stride_bn  # the up rows of w13 follow the I gate rows
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = rk < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP8:
            sa = tl.load(a_scale_ptr + rm64 * stride_asm + kb * stride_ask, mask=m_mask, other=0.0)
            sb = tl.load(bs_ptrs + (rn // 128) * stride_bsn + kb * stride_bsk, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if EPILOGUE == 1:
            b2 = tl.load(b2_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                b2 = b2.to(tl.float32)
            if FP8:
                sb2 = tl.load(bs_ptrs + ((rn + N) // 128) * stride_bsn + kb * stride_bsk, mask=n_mask, other=0.0)
                acc2 += tl.dot(a, b2) * (sa[:, None] * sb2[None, :])
            else:
                acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
            b2_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = m_mask[:, None] & n_mask[None, :]
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn[None, :] * stride_cn
    if EPILOGUE == 0:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        # acc = gate, acc2 = up; c = h [M, I]; aux = gate_up [M, 2I] kept for backward (or None).
        h = acc / (1.0 + tl.exp(-acc)) * acc2
        tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=mask)
        if aux_ptr is not None:
            x_ptrs = aux_ptr + rm64[:, None] * stride_xm + rn[None, :] * stride_xn
            tl.store(x_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
            tl.store(x_ptrs + N * stride_xn, acc2.to(aux_ptr.dtype.element_ty), mask=mask)
    else:
        # acc = dh [M, I]; aux = gate_up [M, 2I] (in); c = d_gate_up [M, 2I]; aux_out = h [M, I].
        x_ptrs = aux_ptr + rm64[:, None] * stride_xm + rn[None, :] * stride_xn
        gate = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptrs + N * stride_xn, mask=mask, other=0.0).to(tl.float32)
        # Each output is stored as soon as it is computed: keeps fewer [BM, BN] tiles live (no spills).
        sig = 1.0 / (1.0 + tl.exp(-gate))
        silu = gate * sig
        y_ptrs = aux_out_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, (silu * up).to(aux_out_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptrs + N * stride_cn, (acc * silu).to(c_ptr.dtype.element_ty), mask=mask)
        # d silu(g) / dg = sig * (1 + g (1 - sig)) = sig + silu (1 - sig)
        tl.store(c_ptrs, (acc * up * (sig + silu * (1.0 - sig))).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def k_grouped_gemm(
        a_ptr, b_ptr, c_ptr, offsets_ptr,
        a_scale_ptr, b_scale_ptr,  # FP8 only, 128x1 tiles: A [ceil(M/128), N], B [ceil(M/128), K]
        M, N, K, E,
        stride_am, stride_an, stride_bm, stride_bk, stride_ce, stride_cn, stride_ck,
        stride_asm, stride_asn, stride_bsm, stride_bsk,
        FP8: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """C[e] = A[rows of e]^T @ B[rows of e] for one (expert, N tile, K tile) per program; written
    (as zeros) for empty experts too. Rows are walked in BLOCK_R chunks aligned to multiples of
    BLOCK_R, so for FP8 (BLOCK_R = 128) every chunk lies in one 128-row scale tile; the rows of the
    neighbouring experts in the first and last chunk are masked out."""
    tl.static_assert(not FP8 or BLOCK_R == 128, "FP8 wgrad walks the 128-row scale tiles: BLOCK_R must be 128")
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
    e = pid // (num_pid_n * num_pid_k)
    pid_n = (pid // num_pid_k) % num_pid_n
    pid_k = pid % num_pid_k
    start = _row_bound(offsets_ptr, e - 1, e > 0, M)
    end = _row_bound(offsets_ptr, e, e < E, M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    # 64-bit column offsets: FP8 operands are column-major ([K, M] storage), where k * M can pass 2^31.
    a_cols = a_ptr + rn.to(tl.int64)[:, None] * stride_an
    b_cols = b_ptr + rk.to(tl.int64)[None, :] * stride_bk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range((start // BLOCK_R) * BLOCK_R, end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = (rr >= start) & (rr < end)
        rr64 = rr.to(tl.int64)
        a = tl.load(a_cols + rr64[None, :] * stride_am, mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # A^T
        b = tl.load(b_cols + rr64[:, None] * stride_bm, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP8:
            tile = r0 // 128
            sa = tl.load(a_scale_ptr + tile * stride_asm + rn * stride_asn, mask=n_mask, other=0.0)
            sb = tl.load(b_scale_ptr + tile * stride_bsm + rk * stride_bsk, mask=k_mask, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + rn[:, None] * stride_cn + rk[None, :] * stride_ck
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
