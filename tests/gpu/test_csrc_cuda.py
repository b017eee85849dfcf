"""The CUDA launcher of the csrc/ dispatch/combine kernels equals their host build on the same inputs.

Both compile the same `__host__ __device__` bodies, so the integer layouts and the row copies are
bit-identical. FP8 quantization (an IEEE division and a power-of-two scale) is exact on both sides.
The weighted sums of combine add the same fp32 products in the same order, but nvcc may contract a
multiply-add into an FMA that the host build (-ffp-contract=off) does not: one rounding less per
term, so they agree to a few fp32 ulps of the accumulated magnitude, 1e-6 relative.
"""
import pytest
import torch
from conftest import DEVICE
from dispatch_testing import randn, routing

from dsv3.kernels import dispatch

SIZES = [(1, 7), (45, 300), (2048, 7168)]  # (tokens, hidden): one token, odd sizes, V3's hidden


def _layouts(n_tokens: int, seed: int):
    topk = routing(n_tokens, 8, 64, seed=seed, masked=0.1)
    host = dispatch.dispatch_layout(topk, 64, 8, align=16)
    dev = dispatch.dispatch_layout(topk.to(DEVICE), 64, 8, align=16)
    return topk, host, dev


@pytest.mark.parametrize("n_tokens,h", SIZES)
def test_layout_and_permute_are_bit_identical(n_tokens, h):
    _, host, dev = _layouts(n_tokens, seed=n_tokens)
    for name in host.__dataclass_fields__:
        assert torch.equal(getattr(dev, name).cpu(), getattr(host, name)), f"layout field {name} differs"
    for dtype in (torch.float32, torch.bfloat16):
        x = randn(n_tokens, h, dtype=dtype, seed=1)
        got = dispatch.permute(x.to(DEVICE), dev.send_token, dev.token_row).cpu()
        assert torch.equal(got, dispatch.permute(x, host.send_token, host.token_row)), f"permute {dtype}"


@pytest.mark.parametrize("n_tokens,h", SIZES)
def test_fp8_permute_is_bit_identical(n_tokens, h):
    _, host, dev = _layouts(n_tokens, seed=n_tokens + 1)
    x = (randn(n_tokens, h, dtype=torch.float32, seed=2) * 5).to(torch.bfloat16)
    q, s = dispatch.permute_fp8(x.to(DEVICE), dev.send_token)
    q_ref, s_ref = dispatch.permute_fp8(x, host.send_token)
    assert torch.equal(s.cpu(), s_ref), "FP8 scales differ"
    assert torch.equal(q.cpu().float(), q_ref.float()), "FP8 values differ"


@pytest.mark.parametrize("n_tokens,h", SIZES)
def test_combine_and_backward_agree(n_tokens, h):
    _, host, dev = _layouts(n_tokens, seed=n_tokens + 2)
    n_rows = host.pair_src.shape[0]
    for dtype in (torch.float32, torch.bfloat16):
        y = randn(n_rows, h, dtype=dtype, seed=3)
        w = randn(n_tokens, 8, seed=4)
        outs = []
        for lay, dev_ in ((dev, DEVICE), (host, torch.device("cpu"))):
            yy, ww = y.to(dev_).requires_grad_(dtype == torch.float32), w.to(dev_).requires_grad_()
            out = dispatch.combine(yy, lay.pair_pos, lay.pair_src, ww, torch.float32)
            out.backward(randn(n_tokens, h, seed=5).to(dev_))
            outs.append([out.detach().cpu(), ww.grad.cpu()] + ([yy.grad.cpu()] if yy.grad is not None else []))
        for name, a, b in zip(("out", "dweights", "dy"), *outs):
            scale = b.abs().max().item() or 1.0
            assert (a - b).abs().max().item() <= 1e-6 * scale * (h ** 0.5 if name == "dweights" else 1), \
                f"combine {name} ({dtype}) differs beyond fp32 contraction"
