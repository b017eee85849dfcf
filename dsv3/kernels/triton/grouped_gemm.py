"""Grouped GEMMs on the contiguous expert-major layout: forward, dgrad, wgrad, and the two SwiGLU
fusions. Same names and signatures as their twins in `dsv3.kernels.reference`; operands are plain
fp32/fp16/bf16 tensors or `Fp8Tensor`s (x, dy: 1x128; weights: 128x128; wgrad operands: 128x1).

Each `plan_*` function validates, allocates the outputs and returns a `Launch` without touching
data (no host sync; meta tensors work), which is also what the AOT checker compiles.
"""
import torch
import triton

from dsv3.kernels.fp8_format import FP8_DTYPE, Fp8Tensor, check_fp8
from dsv3.kernels.triton import gemm_kernels
from dsv3.kernels.triton.configs import INTERPRETER, gemm_config
from dsv3.kernels.triton.runtime import Launch, arch_for

Operand = torch.Tensor | Fp8Tensor

NO_EPILOGUE, SWIGLU, SWIGLU_BACKWARD = 0, 1, 2


def _split(t: Operand, tiling: str, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(t, Fp8Tensor):
        check_fp8(t, tiling, name)
        return t.data, t.scale
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16, bfloat16 or an Fp8Tensor, got {t.dtype}")
    return t, None


def _common(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, names: str, arch: str | None):
    """Checks shared by both GEMM kinds; returns (FP8?, config row, dtype-dependent kernel flags)."""
    if a.dtype != b.dtype:
        raise TypeError(f"{names}: operands must have one dtype (both FP8 or both the same float type), "
                        f"got {a.dtype} and {b.dtype}")
    if offsets.dtype != torch.int32 or offsets.dim() != 1:
        raise TypeError(f"offsets must be a 1-D int32 tensor of cumulative row ends, got {offsets.dtype} "
                        f"with shape {tuple(offsets.shape)}")
    if offsets.device != a.device or b.device != a.device:
        raise ValueError(f"{names}: operands and offsets must be on one device, got {a.device}, {b.device}, "
                         f"{offsets.device}")
    arch = arch or arch_for(a)
    fp8 = a.dtype == FP8_DTYPE
    flags = dict(FP8=fp8, UPCAST=arch == INTERPRETER and a.dtype == torch.bfloat16,
                 INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    return fp8, arch, flags


def _default_out(a: Operand, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.bfloat16 if isinstance(a, Fp8Tensor) else a.dtype


def plan_m_grouped(a: Operand, w: Operand, offsets: torch.Tensor, *, transpose_w: bool, epilogue: int = NO_EPILOGUE,
                   out_dtype: torch.dtype | None = None, aux: torch.Tensor | None = None, save_aux: bool = True,
                   arch: str | None = None) -> Launch:
    """C[rows of e] = A[rows of e] @ (W_e^T if transpose_w else W_e), with an optional SwiGLU epilogue."""
    a_data, a_scale = _split(a, "1x128", "x")
    w_data, w_scale = _split(w, "128x128", "w")
    fp8, arch, flags = _common(a_data, w_data, offsets, "grouped GEMM", arch)
    if (a_scale is None) != (w_scale is None):
        raise TypeError("grouped GEMM: give both operands as Fp8Tensor or neither")
    if a_data.dim() != 2 or w_data.dim() != 3:
        raise ValueError(f"grouped GEMM takes rows [M, K] and expert weights [E, N, K], got {tuple(a_data.shape)} "
                         f"and {tuple(w_data.shape)}")
    E = w_data.shape[0]
    if offsets.numel() != E:
        raise ValueError(f"offsets has {offsets.numel()} entries for {E} experts")
    # B_e[k, n] as strides of w (and of its block scales, whose two tile axes swap the same way).
    if transpose_w:
        N, K = w_data.shape[1], w_data.shape[2]
        stride_bk, stride_bn = w_data.stride(2), w_data.stride(1)
        bs_strides = (w_scale.stride(0), w_scale.stride(2), w_scale.stride(1)) if fp8 else (0, 0, 0)
    else:
        K, N = w_data.shape[1], w_data.shape[2]
        stride_bk, stride_bn = w_data.stride(1), w_data.stride(2)
        bs_strides = (w_scale.stride(0), w_scale.stride(1), w_scale.stride(2)) if fp8 else (0, 0, 0)
    M = a_data.shape[0]
    if a_data.shape[1] != K:
        raise ValueError(f"grouped GEMM: rows have {a_data.shape[1]} features, the weights expect {K}")
    out_dtype = _default_out(a, out_dtype)
    dev = a_data.device
    aux_out = None
    if epilogue == SWIGLU:
        if N % 2:
            raise ValueError(f"SwiGLU needs [gate; up] weights with an even number of rows, got {N}")
        N //= 2
        c = torch.empty(M, N, dtype=out_dtype, device=dev)
        aux = torch.empty(M, 2 * N, dtype=out_dtype, device=dev) if save_aux else None
        outputs = (c, aux)
    elif epilogue == SWIGLU_BACKWARD:
        if aux is None or tuple(aux.shape) != (M, 2 * N):
            raise ValueError(f"SwiGLU backward needs gate_up of shape {(M, 2 * N)}, got "
                             f"{None if aux is None else tuple(aux.shape)}")
        c = torch.empty(M, 2 * N, dtype=out_dtype, device=dev)
        aux_out = torch.empty(M, N, dtype=out_dtype, device=dev)
        outputs = (c, aux_out)
    else:
        c = torch.empty(M, N, dtype=out_dtype, device=dev)
        outputs = (c,)
    family = ("fp8_" if fp8 else "") + {NO_EPILOGUE: "gemm", SWIGLU: "gemm_swiglu",
                                        SWIGLU_BACKWARD: "gemm_dswiglu"}[epilogue]
    cfg = gemm_config(family, arch)
    # Upper bound of the number of row tiles: sum_e ceil(rows_e / BM) <= (M + E (BM - 1)) / BM, and <= M.
    grid_m = min(M, (M + E * (cfg.block_m - 1)) // cfg.block_m)
    args = dict(
        a_ptr=a_data, b_ptr=w_data, c_ptr=c, offsets_ptr=offsets, a_scale_ptr=a_scale, b_scale_ptr=w_scale,
        aux_ptr=aux, aux_out_ptr=aux_out, M=M, N=N, K=K, E=E, grid_m=grid_m,
        stride_am=a_data.stride(0), stride_ak=a_data.stride(1),
        stride_be=w_data.stride(0), stride_bk=stride_bk, stride_bn=stride_bn,
        stride_cm=c.stride(0), stride_cn=c.stride(1),
        stride_asm=a_scale.stride(0) if fp8 else 0, stride_ask=a_scale.stride(1) if fp8 else 0,
        stride_bse=bs_strides[0], stride_bsk=bs_strides[1], stride_bsn=bs_strides[2],
        stride_xm=aux.stride(0) if aux is not None else 0, stride_xn=aux.stride(1) if aux is not None else 0,
        stride_ym=aux_out.stride(0) if aux_out is not None else 0,
        stride_yn=aux_out.stride(1) if aux_out is not None else 0,
        EPILOGUE=epilogue, **flags, E_POW2=triton.next_power_of_2(E),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    return Launch(gemm_kernels.m_grouped_gemm, (grid_m * triton.cdiv(N, cfg.block_n),), args,
                  cfg.num_warps, cfg.num_stages, outputs)


def plan_k_grouped(dy: Operand, x: Operand, offsets: torch.Tensor, *, out_dtype: torch.dtype | None = None,
                   arch: str | None = None) -> Launch:
    """dW[e] = dy[rows of e]^T @ x[rows of e] -> [E, N, K]."""
    a_data, a_scale = _split(dy, "128x1", "dy")
    b_data, b_scale = _split(x, "128x1", "x")
    fp8, arch, flags = _common(a_data, b_data, offsets, "grouped wgrad", arch)
    if a_data.dim() != 2 or b_data.dim() != 2 or a_data.shape[0] != b_data.shape[0]:
        raise ValueError(f"grouped wgrad takes dy [M, N] and x [M, K] with the same rows, got "
                         f"{tuple(a_data.shape)} and {tuple(b_data.shape)}")
    E, (N, K) = offsets.numel(), (a_data.shape[1], b_data.shape[1])
    c = torch.empty(E, N, K, dtype=_default_out(dy, out_dtype), device=a_data.device)
    cfg = gemm_config("fp8_wgrad" if fp8 else "wgrad", arch)
    args = dict(
        a_ptr=a_data, b_ptr=b_data, c_ptr=c, offsets_ptr=offsets, a_scale_ptr=a_scale, b_scale_ptr=b_scale,
        M=a_data.shape[0], N=N, K=K, E=E, stride_am=a_data.stride(0), stride_an=a_data.stride(1),
        stride_bm=b_data.stride(0), stride_bk=b_data.stride(1),
        stride_ce=c.stride(0), stride_cn=c.stride(1), stride_ck=c.stride(2),
        stride_asm=a_scale.stride(0) if fp8 else 0, stride_asn=a_scale.stride(1) if fp8 else 0,
        stride_bsm=b_scale.stride(0) if fp8 else 0, stride_bsk=b_scale.stride(1) if fp8 else 0,
        **flags, BLOCK_N=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_R=cfg.block_k)
    grid = (E * triton.cdiv(N, cfg.block_m) * triton.cdiv(K, cfg.block_n),)
    return Launch(gemm_kernels.k_grouped_gemm, grid, args, cfg.num_warps, cfg.num_stages, (c,))


# ------------------------------------------------------------------------------------------------
# Public API (twins of dsv3.kernels.reference)
# ------------------------------------------------------------------------------------------------

def grouped_linear(x: Operand, w: Operand, offsets: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward: y[rows of e] = x[rows of e] @ w[e].T; x [M, K], w [E, N, K] -> [M, N]."""
    return plan_m_grouped(x, w, offsets, transpose_w=True, out_dtype=out_dtype).run()


def grouped_linear_dgrad(dy: Operand, w: Operand, offsets: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Input gradient: dx[rows of e] = dy[rows of e] @ w[e]; dy [M, N], w [E, N, K] -> [M, K]."""
    return plan_m_grouped(dy, w, offsets, transpose_w=False, out_dtype=out_dtype).run()


def grouped_linear_wgrad(dy: Operand, x: Operand, offsets: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weight gradient: dw[e] = dy[rows of e].T @ x[rows of e]; -> [E, N, K], zeros for empty experts."""
    return plan_k_grouped(dy, x, offsets, out_dtype=out_dtype).run()


def gate_up_swiglu(x: Operand, w13: Operand, offsets: torch.Tensor, out_dtype: torch.dtype | None = None,
                   save_gate_up: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h [M, I], gate_up [M, 2I] or None): the fused [gate; up] projection with SwiGLU epilogue."""
    return plan_m_grouped(x, w13, offsets, transpose_w=True, epilogue=SWIGLU, out_dtype=out_dtype,
                          save_aux=save_gate_up).run()


def swiglu_dgrad(dy: Operand, w2: Operand, gate_up: torch.Tensor, offsets: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate_up [M, 2I], h [M, I]): dgrad of the down projection (dh = dy @ w2[e]) fused with the
    SwiGLU backward, recomputing h from gate_up for the down projection's wgrad."""
    return plan_m_grouped(dy, w2, offsets, transpose_w=False, epilogue=SWIGLU_BACKWARD, out_dtype=out_dtype,
                          aux=gate_up).run()
