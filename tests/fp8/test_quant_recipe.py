"""The quantization facts the recipe relies on (the format's own guarantees - error per tile, 448,
the amax floor, power-of-two scales - are tested in tests/kernels/test_quant.py)."""
import torch

from dsv3.kernels import reference
from dsv3.kernels.dispatch_reference import quantize_fp8_1x128
from dsv3.kernels.fp8_format import DEFAULT_AMAX_FLOOR
from tests.fp8.fp8_cases import tiled_randn


def test_retiling_power_of_two_tiles_is_exact_in_the_normal_range():
    """Why attn_out and expert_in get power-of-two scales (report §3.3.3): Wgrad re-tiles the cached
    1x128 FP8 input to 128x1. With power-of-two scales that only shifts exponents, so every value that
    stays in E4M3's normal range (>= 2^-6 in units of the new scale) is carried over exactly; with
    ordinary scales values are rounded a second time."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 256, generator=g) * torch.rand(300, 1, generator=g) * 4  # rows of different scales
    for pow2 in (True, False):
        rows = reference.quantize(x, "1x128", pow2_scales=pow2)
        cols = reference.requantize(rows, "1x128", "128x1", pow2_scales=pow2)
        before, after = reference.dequantize(rows, "1x128"), reference.dequantize(cols, "128x1")
        col_scale = cols.scale.repeat_interleave(128, 0)[:300]
        normal = before.abs() >= 2.0 ** -6 * col_scale
        changed = (after != before) & normal
        assert normal.float().mean() > 0.9
        if pow2:
            assert not changed.any(), f"{changed.sum().item()} values rounded again"
        else:
            share = changed.sum() / normal.sum()
            assert share > 0.5, f"ordinary scales rounded only {share:.0%} of the values a second time"


def test_dispatch_quantization_is_the_recipes_expert_input_quantization():
    """The FP8 rows a dispatch sends (csrc kernel; its twin here, bit-identical to it by tests/csrc) are
    what the recipe's expert_in quantization gives: power-of-two 1x128 scales, floor 1e-4, bit for bit.
    So experts may use dispatched rows as they are: ep > 1 computes what one process computes."""
    x = tiled_randn(77, 200, seed=1)  # 200: one full and one narrow 128-wide tile
    x[3] = 0.0  # an all-zero row: the floor
    x[5, :128] = 1e-9  # below the floor
    x[7, 0] = 448.0 * 2.0 ** -3  # amax / 448 exactly a power of two
    q, s = quantize_fp8_1x128(x)
    mine = reference.quantize(x, "1x128", pow2_scales=True, amax_floor=DEFAULT_AMAX_FLOOR)
    assert torch.equal(s, mine.scale)
    assert torch.equal(q.view(torch.uint8), mine.data.view(torch.uint8))
