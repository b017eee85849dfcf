"""The host build's software conversions (csrc/portable.cuh) round exactly like torch's casts.

Reached through the kernels: a converting gather is one conversion per element, and an FP8 permute
of rows whose amax is exactly 448 has scale 1, so it is a bare float -> E4M3 cast.
"""
import torch

from dsv3.kernels import dispatch

ALL_ROWS = torch.tensor([0])


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dispatch.gather_rows(x.view(1, -1), ALL_ROWS, None, dtype).view(-1)


def assert_same_bits_or_both_nan(got: torch.Tensor, want: torch.Tensor):
    nan = want.float().isnan()
    assert torch.equal(got.float().isnan(), nan)
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    assert torch.equal(got[~nan].view(int_type), want[~nan].view(int_type))


def float_edges() -> torch.Tensor:
    """Random fp32 bit patterns over the whole range, plus values around 16-bit rounding boundaries
    (ties, one ulp either side), the fp16 overflow and subnormal edges."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    halves = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    bf16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    grid = torch.cat([halves, bf16])
    grid = grid[grid.isfinite()]
    mids = (grid[:-1].double() + grid[1:].double()).div(2).float()
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e30, -1e-30, 2**-24, 2**-25, 3 * 2**-26,
                             float("inf"), float("-inf"), float("nan")])
    return torch.cat([bits.view(torch.float32), grid, near, specials])


def test_float_to_bf16_and_fp16_round_like_torch():
    x = float_edges()
    for dtype in (torch.bfloat16, torch.float16):
        assert_same_bits_or_both_nan(cast(x, dtype), x.to(dtype))


def test_bf16_and_fp16_to_float_are_exact_like_torch():
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        v = every.view(dtype)
        assert_same_bits_or_both_nan(cast(v, torch.float32), v.float())


def test_float_to_e4m3_rounds_like_torch_in_the_scaled_range():
    # every E4M3 value, the midpoints between neighbours (ties to even), one fp32 ulp either side
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[:-1] + grid[1:]) / 2  # exact in fp32
    x = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                   torch.tensor([2**-10, -2**-11, 3 * 2**-11, 1e-30])])
    x = x[x.abs() <= 448]
    rows = -(-len(x) // 127)
    padded = torch.cat([x, torch.zeros(rows * 127 - len(x))]).view(rows, 127)
    tiles = torch.cat([torch.full((rows, 1), 448.0), padded], 1)  # amax 448: scale exactly 1
    q, scales = dispatch.permute_fp8(tiles, torch.arange(rows))
    assert (scales == 1).all()
    assert torch.equal(q.view(torch.uint8), tiles.to(torch.float8_e4m3fn).view(torch.uint8))
