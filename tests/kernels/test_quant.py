"""FP8 tile quantization: the format's guarantees, for the Triton kernels (interpreter) and their twins."""
import pytest
import torch
from kernel_cases import randn

from dsv3.kernels import reference
from dsv3.kernels import triton as tk
from dsv3.kernels.fp8_format import DEFAULT_AMAX_FLOOR, FP8_MAX, Fp8Tensor, scale_shape, tile_groups

IMPLS = {"reference": reference, "triton": tk}
# Partial tiles in both directions (294 = 2*128 + 38, 200 = 128 + 72); weights batched per expert.
SHAPES = {"1x128": (294, 200), "128x1": (294, 200), "128x128": (3, 200, 160)}


def _per_element(scale: torch.Tensor, tiling: str, shape) -> torch.Tensor:
    gr, gc = tile_groups(tiling)
    return scale.repeat_interleave(gr, -2).repeat_interleave(gc, -1)[..., :shape[-2], :shape[-1]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tiling", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_values_within_half_an_e4m3_step(impl, tiling, dtype):
    # E4M3 keeps 3 mantissa bits: rounding moves x/scale by at most 2^-4 of itself (normal range)
    # or half the subnormal spacing 2^-9 (below 2^-6).
    x = randn(*SHAPES[tiling], dtype=dtype, scale=3.0)
    q = IMPLS[impl].quantize(x, tiling)
    assert q.data.shape == x.shape and tuple(q.scale.shape) == scale_shape(tuple(x.shape), tiling)
    err = (reference.dequantize(q, tiling) - x.float()).abs()
    bound = x.float().abs() * 2 ** -4 + _per_element(q.scale, tiling, x.shape) * 2 ** -10
    assert (err <= bound * (1 + 1e-6)).all(), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tiling", SHAPES)
def test_each_tile_amax_maps_to_448_and_outliers_saturate(impl, tiling):
    x = randn(*SHAPES[tiling], scale=2.0)
    x.view(-1)[::997] = 3e4  # outliers
    q = IMPLS[impl].quantize(x, tiling)
    data = q.data.float()
    assert torch.isfinite(data).all() and data.abs().max() == FP8_MAX
    # scale = amax / 448 exactly, so every tile holds +-448 where its amax sits.
    tiles_amax = reference._tiles(data.abs(), tiling).amax(dim=(-3, -1))
    assert torch.equal(tiles_amax, torch.full_like(tiles_amax, FP8_MAX))


@pytest.mark.parametrize("impl", IMPLS)
def test_amax_floor_keeps_zero_and_tiny_tiles_finite(impl):
    x = randn(4, 256)
    x[0, :128] = 0.0  # an all-zero tile
    x[1, :128] = 1e-7  # amax below the floor
    q = IMPLS[impl].quantize(x, "1x128")
    floor_scale = torch.tensor(DEFAULT_AMAX_FLOOR, dtype=torch.float32) / FP8_MAX  # computed in fp32, as the kernels do
    assert q.scale[0, 0] == floor_scale and q.scale[1, 0] == floor_scale
    assert torch.equal(q.data[0, :128].float(), torch.zeros(128))
    assert torch.allclose(reference.dequantize(q)[1, :128], x[1, :128], rtol=2 ** -4)
    with pytest.raises(ValueError, match="amax_floor must be > 0"):
        IMPLS[impl].quantize(x, "1x128", amax_floor=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tiling", SHAPES)
def test_pow2_scales_are_powers_of_two_covering_the_amax(impl, tiling):
    x = randn(*SHAPES[tiling], scale=5.0)
    q = IMPLS[impl].quantize(x, tiling, pow2_scales=True)
    mantissa, _ = torch.frexp(q.scale)
    assert torch.equal(mantissa, torch.full_like(mantissa, 0.5)), "a scale is not a power of two"
    amax = reference._tiles(x.abs(), tiling).amax(dim=(-3, -1))
    exact = amax.clamp_min(DEFAULT_AMAX_FLOOR) / FP8_MAX
    assert (q.scale >= exact).all() and (q.scale < 2 * exact).all(), "not the smallest power of two >= amax/448"
    assert q.data.float().abs().max() <= FP8_MAX


@pytest.mark.parametrize("tiling,pow2,dtype", [
    ("1x128", False, torch.bfloat16), ("1x128", True, torch.float32), ("128x1", False, torch.float16),
    ("128x1", True, torch.bfloat16), ("128x128", False, torch.float32), ("128x128", True, torch.bfloat16)])
def test_triton_quantize_equals_twin_bitwise(tiling, pow2, dtype):
    # Same formula (IEEE division by the fp32 scale, round to nearest even); the interpreter divides
    # exactly like torch, so data and scales agree bit for bit.
    x = randn(*SHAPES[tiling], dtype=dtype, scale=7.0)
    a, b = tk.quantize(x, tiling, pow2_scales=pow2), reference.quantize(x, tiling, pow2_scales=pow2)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.data.view(torch.uint8), b.data.contiguous().view(torch.uint8))


@pytest.mark.parametrize("tiling", SHAPES)
def test_triton_dequantize_equals_twin(tiling):
    q = reference.quantize(randn(*SHAPES[tiling], scale=3.0), tiling)
    assert torch.equal(tk.dequantize(q, tiling), reference.dequantize(q, tiling))  # one exact fp32 product
    # bf16 output: one rounding of that product; the interpreter truncates where torch rounds to
    # nearest, so the two may differ by one bf16 step (2^-7 relative), never more.
    a, b = tk.dequantize(q, tiling, torch.bfloat16).float(), reference.dequantize(q, tiling, torch.bfloat16).float()
    assert ((a - b).abs() <= b.abs() * 2 ** -7).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pow2", [False, True])
def test_row_to_column_requantization_equals_quantizing_the_dequantized_tensor(impl, pow2):
    rows = reference.quantize(randn(294, 200, scale=3.0, seed=1), "1x128", pow2_scales=pow2)
    cols = IMPLS[impl].requantize(rows, "1x128", "128x1", pow2_scales=pow2)
    expected = reference.quantize(reference.dequantize(rows, "1x128"), "128x1", pow2_scales=pow2)
    assert torch.equal(cols.scale, expected.scale)
    assert torch.equal(cols.data.float(), expected.data.float())


def test_128x1_data_is_stored_column_major_for_the_wgrad_gemm():
    q = tk.quantize(randn(294, 200), "128x1")
    assert q.data.shape == (294, 200) and q.data.stride() == (1, 294)
    assert tk.requantize(reference.quantize(randn(294, 200), "1x128")).data.stride() == (1, 294)


def test_scale_shapes_and_unknown_tilings():
    assert scale_shape((294, 200), "1x128") == (294, 2)
    assert scale_shape((294, 200), "128x1") == (3, 200)
    assert scale_shape((3, 200, 160), "128x128") == (3, 2, 2)
    with pytest.raises(ValueError, match="'1x64' is not one of"):
        tk.quantize(randn(4, 4), "1x64")
    with pytest.raises(ValueError, match=r"needs scales of shape \(4, 1\)"):
        tk.dequantize(Fp8Tensor(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 4)), "1x128")
