"""The fine-grained FP8 format of DeepSeek-V3 (report §3.3.2), shared by the reference twins and the kernels.

An FP8 operand is a pair (data, scale) with `data` in E4M3 and `scale` fp32 such that
`real ≈ data * scale`, one scale per tile:

| tiling   | used for                                  | data    | scale                              |
|----------|-------------------------------------------|---------|------------------------------------|
| 1x128    | activations and activation gradients      | [M, K]  | [M, ceil(K/128)]                   |
| 128x1    | the same, as the K operand of a wgrad GEMM| [M, K]  | [ceil(M/128), K]                   |
| 128x128  | weights (2-D or per expert, 3-D)          | [.., N, K] | [.., ceil(N/128), ceil(K/128)]  |

scale = max(amax(tile), amax_floor) / 448, optionally rounded *up* to a power of two (so that
|data| <= 448 still holds and rescaling is exact; the report uses this for dispatched activations).
Tiles of 128x1 are taken over the global rows, so they may straddle two experts; a grouped GEMM
simply masks the other expert's rows (exact, only the scale is shared).
"""
from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite E4M3 value
TILE = 128               # the report's quantization tile and promotion interval along K
DEFAULT_AMAX_FLOOR = 1e-4  # keeps scales finite and non-zero on all-zero tiles (padding rows)
FP8_MIN_CAPABILITY = (8, 9)  # E4M3 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards


class Fp8Tensor(NamedTuple):
    """FP8 data and its fp32 scales; which tiling is meant follows from the shapes (table above)."""
    data: torch.Tensor
    scale: torch.Tensor


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(shape: tuple[int, ...], tiling: str) -> tuple[int, ...]:
    """Shape of the scale tensor of a tensor of `shape` quantized with `tiling` ('1x128', '128x1', '128x128')."""
    *batch, rows, cols = shape
    group_rows, group_cols = tile_groups(tiling)
    return (*batch, cdiv(rows, group_rows), cdiv(cols, group_cols))


def tile_groups(tiling: str) -> tuple[int, int]:
    """(rows, cols) of one quantization tile."""
    groups = {"1x128": (1, TILE), "128x1": (TILE, 1), "128x128": (TILE, TILE)}
    if tiling not in groups:
        raise ValueError(f"FP8 tiling {tiling!r} is not one of {tuple(groups)}")
    return groups[tiling]


def check_amax_floor(amax_floor: float) -> None:
    if not amax_floor > 0:
        raise ValueError(f"amax_floor must be > 0 (it keeps scales non-zero on all-zero tiles), got {amax_floor}")


def check_fp8(t: Fp8Tensor, tiling: str, name: str) -> None:
    """Fail with the expected shapes when `t` is not `tiling`-quantized data."""
    if t.data.dtype != FP8_DTYPE:
        raise TypeError(f"{name}.data must be {FP8_DTYPE}, got {t.data.dtype}")
    if t.scale.dtype != torch.float32:
        raise TypeError(f"{name}.scale must be torch.float32, got {t.scale.dtype}")
    expected = scale_shape(tuple(t.data.shape), tiling)
    if tuple(t.scale.shape) != expected:
        raise ValueError(f"{name}: a {tiling}-quantized tensor of shape {tuple(t.data.shape)} needs scales of "
                         f"shape {expected}, got {tuple(t.scale.shape)}")


# An FP8 dispatch (expert parallelism) receives rows as FP8 and must still hand the experts an ordinary
# differentiable tensor (the MoE layer is tensor-in, tensor-out). It attaches the FP8 rows it received to
# that tensor, so that FP8 experts use them as they are instead of quantizing the rows a second time.
_ATTACHED = "_dsv3_fp8_rows"


def attach_fp8(x: torch.Tensor, q: Fp8Tensor) -> torch.Tensor:
    """Record that `x` equals `q` dequantized (1x128 tiles); returns x."""
    if tuple(q.data.shape) != tuple(x.shape):
        raise ValueError(f"attach_fp8: FP8 rows of shape {tuple(q.data.shape)} for a tensor of shape {tuple(x.shape)}")
    setattr(x, _ATTACHED, q)
    return x


def attached_fp8(x: torch.Tensor) -> Fp8Tensor | None:
    """The FP8 rows `attach_fp8` recorded on this very tensor object, or None."""
    return getattr(x, _ATTACHED, None)
