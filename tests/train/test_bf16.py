"""precision=bf16: the routed experts compute in bf16 under autocast (autocast does not reach their
custom autograd Functions; `ops.autocast_operands` casts for them), master weights and their gradients
stay fp32, and a bf16 run trains."""
import pytest
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model.moe import Experts
from tests.helpers import read_metrics, run_pretrain


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_experts_compute_in_the_autocast_dtype_with_fp32_masters(impl):
    torch.manual_seed(0)
    experts = Experts(4, 32, 16, impl)
    for w in (experts.w13, experts.w2):
        torch.nn.init.normal_(w, std=0.1)
    x = torch.randn(10, 32, requires_grad=True)  # the fp32 residual stream
    offsets = torch.tensor([3, 3, 7, 10], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, offsets)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert experts.w13.grad.dtype == torch.float32 and experts.w2.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    exact = experts(x.detach(), offsets)  # fp32, outside autocast
    assert (y.float() - exact).abs().max() <= 2 ** -7 * exact.abs().max() * 4  # a few bf16 roundings


def test_bf16_run_trains(tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_pretrain(run_dir, "+experiment=moe_tiny", "precision=bf16", "train.max_steps=20", "train.resume=none",
                     "train.val_every=0", "checkpoint.every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16" in r.stderr + r.stdout
    m = read_metrics(run_dir)
    losses = [x["loss"] for x in m]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
