"""Inputs and error bounds shared by the FP8 recipe tests.

E4M3 keeps 3 mantissa bits, so rounding v/scale to it moves it by at most u = 2^-4 of itself in the
normal range (|v/scale| >= 2^-6) and by at most half the subnormal spacing 2^-9 below it. With the
scale of v's tile, s = max(amax, floor)/448 (rounded up to a power of two where the recipe says so),
each quantized element therefore satisfies

    |q(v) - v| <= E(v) = u |v| + 2^-10 s.

These helpers compute s from the tile amaxes independently of the kernels, and from it E(v).
"""
import torch

U = 2.0 ** -4          # E4M3 unit roundoff (3 mantissa bits)
SUB = 2.0 ** -10       # half the subnormal spacing 2^-9, in units of the scale
FLOOR = 1e-4
TILES = {"1x128": (1, 128), "128x1": (128, 1), "128x128": (128, 128)}


def tile_scale(v: torch.Tensor, tiling: str, pow2: bool = False) -> torch.Tensor:
    """The scale of every element's tile, per element (float64)."""
    gr, gc = TILES[tiling]
    *batch, rows, cols = v.shape
    pr, pc = -(-rows // gr) * gr, -(-cols // gc) * gc
    a = torch.nn.functional.pad(v.double().abs(), (0, pc - cols, 0, pr - rows))
    amax = a.reshape(*batch, pr // gr, gr, pc // gc, gc).amax(dim=(-3, -1)).clamp_min(FLOOR)
    s = (amax.float() / 448.0).double()  # fp32 arithmetic, as the kernels compute it
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s.repeat_interleave(gr, -2).repeat_interleave(gc, -1)[..., :rows, :cols]


def quant_error(v: torch.Tensor, tiling: str, pow2: bool = False) -> torch.Tensor:
    """E(v): the largest |q(v) - v| per element (float64)."""
    return U * v.double().abs() + SUB * tile_scale(v, tiling, pow2)


def product_bound(a: torch.Tensor, ea: torch.Tensor, b: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |q(a) @ q(b) - a @ b| for a [M, K], b [K, N] with |q - .| <= e:
    sum_k e_a|b| + |a|e_b + e_a e_b, plus fp32 accumulation (K 2^-24 sum_k |q(a)||q(b)|)."""
    a, b = a.double().abs(), b.double().abs()
    quant = ea @ b + a @ eb + ea @ eb
    accumulation = a.shape[-1] * 2.0 ** -24 * ((a + ea) @ (b + eb))
    return quant + accumulation


def tiled_randn(rows: int, cols: int, seed: int, row_block: int = 1) -> torch.Tensor:
    """Gaussian values whose magnitude drops by 1e-5 on some rows (groups of `row_block` rows: 128 for
    weight blocks) and, independently, on some 128-column blocks. The tiny tiles are quantized well
    only with their own scale: one scale for the whole tensor, or tiles of the wrong orientation,
    flush them to zero (E4M3's range below 448 ends near 448 * 2^-17) and break the bounds at once."""
    g = torch.Generator().manual_seed(seed)

    def magnitudes(n: int, block: int) -> torch.Tensor:
        groups = -(-n // block)
        tiny = torch.rand(groups, generator=g) < 0.4
        mag = torch.where(tiny, 1e-5, 1.0) * (0.5 + 1.5 * torch.rand(groups, generator=g))
        return mag.repeat_interleave(block)[:n]

    return torch.randn(rows, cols, generator=g) * magnitudes(rows, row_block)[:, None] * magnitudes(cols, 128)[None, :]
