"""I (input gradients) then W (weight gradients) equals one full backward, bit for bit, and W
does not recompute the input path."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.parallel.pipeline.backward_split import backward_full, backward_input


class CountBackward(torch.autograd.Function):
    """Identity whose backward counts its calls: marks a point on the input path."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        CountBackward.calls += 1
        return g


class Stage(nn.Module):
    def __init__(self, shared_twice: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.randn(8))
        self.unused = nn.Linear(2, 2)
        self.shared_twice = shared_twice

    def forward(self, x):
        h = CountBackward.apply(self.up(self.norm(x)))
        h = self.down(F.gelu(h)) * self.scale
        if self.shared_twice:            # the same weight at two depths of the stage
            h = self.down(F.gelu(self.up(h)))
        aux = 0.1 * h.pow(2).mean()
        return x + h, aux


def run(stage, split, x0, g):
    stage.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    out, aux = stage(x)
    CountBackward.calls = 0
    grads = [g, torch.tensor(0.25)]
    if split:
        (gx,), job = backward_input([out, aux], grads, [x], list(stage.parameters()))
        calls_in_i = CountBackward.calls
        assert all(p.grad is None for p in stage.parameters()), "I must not touch weights"
        job.run()
        with pytest.raises(RuntimeError, match="already run"):
            job.run()
        assert CountBackward.calls == calls_in_i == 1, "W re-ran the input path"
    else:
        (gx,) = backward_full([out, aux], grads, [x])
    return gx, {n: p.grad for n, p in stage.named_parameters()}


def test_input_then_weight_equals_full_backward_bitwise():
    stage, x0, g = Stage(), torch.randn(4, 8), torch.randn(4, 8)
    gx_full, full = run(stage, False, x0, g)
    gx_split, split = run(stage, True, x0, g)
    assert torch.equal(gx_full, gx_split)
    for name, grad in full.items():
        if name.startswith("unused"):
            assert grad is None and split[name] is None
        else:
            assert torch.equal(grad, split[name]), name


def test_parameter_used_at_two_depths():
    # W runs the shared weight's two uses in one call; the recorded gradients are pinned so
    # the upper use's flow is not added twice (it may recompute part of the input path)
    stage, x0, g = Stage(shared_twice=True), torch.randn(4, 8), torch.randn(4, 8)
    _, full = run_no_count(stage, False, x0, g)
    _, split = run_no_count(stage, True, x0, g)
    for name, grad in full.items():
        if grad is not None:
            torch.testing.assert_close(split[name], grad, rtol=1e-6, atol=1e-7)


def run_no_count(stage, split, x0, g):
    stage.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    out, aux = stage(x)
    if split:
        (gx,), job = backward_input([out, aux], [g, torch.tensor(0.25)], [x], list(stage.parameters()))
        job.run()
    else:
        (gx,) = backward_full([out, aux], [g, torch.tensor(0.25)], [x])
    return gx, {n: p.grad for n, p in stage.named_parameters()}


def test_first_stage_without_input_gradient_defers_everything_to_w():
    emb, lin = nn.Embedding(10, 8), nn.Linear(8, 8)
    ids = torch.tensor([[1, 2, 3]])
    out = lin(emb(ids))
    g = torch.randn_like(out)
    (gin,), job = backward_input([out], [g], [ids], [*emb.parameters(), *lin.parameters()])
    assert gin is None and emb.weight.grad is None and lin.weight.grad is None
    job.run()
    ref_emb, ref_lin = nn.Embedding(10, 8), nn.Linear(8, 8)
    ref_emb.load_state_dict(emb.state_dict())
    ref_lin.load_state_dict(lin.state_dict())
    ref_lin(ref_emb(ids)).backward(g)
    assert torch.equal(emb.weight.grad, ref_emb.weight.grad)
    assert torch.equal(lin.weight.grad, ref_lin.weight.grad)


def test_loss_term_of_parameters_only_goes_to_w():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    out = lin(x)
    reg = lin.weight.pow(2).sum()          # does not depend on the input
    g = torch.randn_like(out)
    (gx,), job = backward_input([out, reg], [g, torch.tensor(0.5)], [x], list(lin.parameters()))
    job.run()
    ref = nn.Linear(4, 4)
    ref.load_state_dict(lin.state_dict())
    xr = x.detach().clone().requires_grad_()
    torch.autograd.backward([ref(xr), ref.weight.pow(2).sum()], [g, torch.tensor(0.5)])
    assert torch.equal(gx, xr.grad)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(lin.bias.grad, ref.bias.grad)


def test_gradients_accumulate_over_microbatches():
    stage, g = Stage(), torch.randn(4, 8)
    xs = [torch.randn(4, 8) for _ in range(3)]
    stage.zero_grad(set_to_none=True)
    jobs = []
    for x0 in xs:                           # all I's first, then the W's, as a schedule may
        x = x0.clone().requires_grad_()
        out, aux = stage(x)
        jobs.append(backward_input([out, aux], [g, torch.tensor(0.25)], [x], list(stage.parameters()))[1])
    for job in jobs:
        job.run()
    split = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    stage.zero_grad(set_to_none=True)
    for x0 in xs:
        x = x0.clone().requires_grad_()
        out, aux = stage(x)
        backward_full([out, aux], [g, torch.tensor(0.25)], [x])
    for n, p in stage.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, split[n]), n
