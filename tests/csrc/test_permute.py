"""Row gathers (the dispatch permute), plain, converting and FP8-quantizing, against their twins.

All comparisons are exact: a copy is a copy; a converting gather does one fp32 multiply and one
round-to-nearest-even conversion on both sides; FP8 scales are powers of two, so x / scale is exact in
fp32 and the only rounding is the E4M3 cast, the same on both sides (its host implementation is
checked against torch's cast in test_numerics.py).
"""
import pytest
import torch

from dispatch_testing import randn, routing
from dsv3.kernels import dispatch, dispatch_reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def src_rows(n_in: int, n_out: int, seed: int) -> torch.Tensor:
    """Random source rows with repeats and a few -1 (zero rows)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, max(n_in, 1), (n_out,), generator=g)
    src[torch.rand(n_out, generator=g) < 0.2] = -1
    return src if n_in else torch.full((n_out,), -1)


# hidden sizes that make the byte copy pick every unit width: 16, 8, 4, 2 and 1 bytes
@pytest.mark.parametrize("dtype,h", [(torch.float32, 300), (torch.float64, 3), (torch.bfloat16, 301),
                                     (torch.float16, 2), (torch.float8_e4m3fn, 129), (torch.int64, 5),
                                     (torch.bfloat16, 0)])
@pytest.mark.parametrize("n_in,n_out", [(40, 57), (1, 1), (0, 6), (7, 0)])
def test_gather_copy_matches_twin(dtype, h, n_in, n_out):
    x = randn(n_in, h, seed=h).to(dtype)
    src = src_rows(n_in, n_out, seed=n_out)
    out = dispatch.gather_rows(x, src)
    assert out.dtype == dtype and out.shape == (n_out, h)
    assert torch.equal(out.view(torch.uint8), dispatch_reference.gather_rows(x, src).view(torch.uint8))


def test_gather_copy_of_an_unaligned_view():
    base = randn(41 * 64 + 1, dtype=torch.bfloat16)
    x = base[1:].view(41, 64)  # data pointer 2 bytes past an allocation boundary
    src = src_rows(41, 30, seed=1)
    assert torch.equal(dispatch.gather_rows(x, src), dispatch_reference.gather_rows(x, src))


@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("scaled", [True, False])
def test_converting_gather_matches_twin(in_dtype, out_dtype, scaled):
    x = randn(33, 261, dtype=in_dtype, seed=2)
    src = src_rows(33, 50, seed=3)
    scale = randn(50, seed=4) if scaled else None
    out = dispatch.gather_rows(x, src, scale, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, dispatch_reference.gather_rows(x, src, scale, out_dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("h", [128, 300, 1, 257])
def test_permute_fp8_matches_reference_quantization(dtype, h):
    x = randn(60, h, dtype=dtype, seed=h)
    x[5] *= 1e4   # large and small magnitudes: scales far from 1
    x[6] *= 1e-3
    x[7] = 0      # an all-zero row: the amax floor gives it a finite scale
    lay = dispatch.dispatch_layout(routing(60, 3, 8, seed=5, masked=0.2), 8, 4, align=4)  # padding rows
    q, scales = dispatch.permute_fp8(x, lay.send_token)
    q_ref, scales_ref = dispatch_reference.permute_fp8(x, lay.send_token)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (len(lay.send_token), -(-h // 128))
    assert torch.equal(scales, scales_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # the format itself: power-of-two scales, and dequantization within E4M3's rounding error
    # (half a step: 2^-4 relative for normals, 2^-10 * scale in the subnormal range)
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))
    tile_scale = scales.repeat_interleave(128, 1)[:, :h]
    deq = q.float() * tile_scale
    ref = dispatch_reference.gather_rows(x, lay.send_token).float()
    assert ((deq - ref).abs() <= 2**-4 * ref.abs() + 2**-10 * tile_scale).all()


def test_gathers_reject_rows_outside_x():
    x = randn(10, 8)
    src = torch.tensor([3, -1, 10, 2])
    for call in (lambda: dispatch.gather_rows(x, src), lambda: dispatch.gather_rows(x, src, None, torch.bfloat16),
                 lambda: dispatch.permute_fp8(x, src)):
        with pytest.raises(RuntimeError, match=r"src_row\[2\] = 10 is not a row of x; accepted: 0..9"):
            call()
    with pytest.raises(RuntimeError, match="dtype Int is not supported; accepted: float32, bfloat16, float16"):
        dispatch.gather_rows(x.int(), src.clamp(max=9), None, torch.float32)
    with pytest.raises(RuntimeError, match=r"row_scale must be float32 of shape \[4\]"):
        dispatch.gather_rows(x, src.clamp(max=9), torch.ones(3))
