"""Shared inputs and comparisons of the kernel tests.

Shapes are small (the interpreter's time grows with the number of programs) and chosen against
the interpreter's 128-wide blocks: rows per expert 0 (empty), 1, 127, 129; feature sizes that are
not multiples of the block (nor of the 128-wide FP8 tiles).
"""
import torch

# Rows per expert. "mixed": empty experts first and in the middle, 1 row, one row short of a block,
# one row past a block. "one_expert": every row in one expert, the others empty.
COUNTS = {"mixed": [0, 127, 1, 0, 129, 37], "one_expert": [0, 0, 200, 0]}
D, N, I = 160, 96, 80  # model dim (GEMM K), an output width, the expert inter dim (gate/up halves)


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)


def randn(*shape, dtype=torch.float32, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected|: the tolerances are stated relative to the
    output's scale, since rounding and summation-order errors scale with it."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * expected.double().abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g} (= {rel:g} * max |expected|)"
