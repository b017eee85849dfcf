"""The dynamic loss scaler against its definition, with overflows injected at chosen steps."""
import torch

from dsv3.train.loss_scale import DynamicLossScaler


def test_overflow_skips_the_step_and_halves_the_scale():
    s = DynamicLossScaler(scale=1024.0, growth_interval=3)
    assert s.update(True) and s.scale == 1024.0
    assert not s.update(False)
    assert s.scale == 512.0 and s.good_steps == 0 and s.skipped_steps == 1


def test_the_scale_grows_after_growth_interval_finite_steps_in_a_row():
    s = DynamicLossScaler(scale=8.0, growth_interval=3)
    outcomes = [True, True, False, True, True, True, True, True, True]  # an overflow resets the count
    scales = []
    for finite in outcomes:
        s.update(finite)
        scales.append(s.scale)
    assert scales == [8.0, 8.0, 4.0, 4.0, 4.0, 8.0, 8.0, 8.0, 16.0]
    assert s.skipped_steps == 1


def test_the_scale_stops_at_its_floor_and_says_so():
    s = DynamicLossScaler(scale=4.0, min_scale=1.0)
    for _ in range(5):
        s.update(False)
    assert s.scale == 1.0 and s.at_floor and s.skipped_steps == 5


def test_a_non_finite_loss_is_not_an_overflow_and_leaves_the_scale_alone():
    """The scale multiplies the loss after the forward: a NaN loss is divergence (train.on_nonfinite
    handles it), not something a smaller scale fixes; finite losses with non-finite gradients are."""
    s = DynamicLossScaler(scale=64.0, growth_interval=2)
    assert not s.record(finite=False, losses_finite=False)
    assert (s.scale, s.good_steps, s.skipped_steps) == (64.0, 0, 0)
    assert s.record(finite=False, losses_finite=True)
    assert (s.scale, s.skipped_steps) == (32.0, 1)
    assert not s.record(finite=True, losses_finite=True) and s.good_steps == 1
    floor = DynamicLossScaler(scale=1.0, min_scale=1.0)
    assert not floor.record(finite=False, losses_finite=True)  # at the floor: divergence, not the scale's
    assert floor.skipped_steps == 1


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    s = DynamicLossScaler(scale=2.0 ** 20, growth_interval=7)
    for finite in (True, False, True, True):
        s.update(finite)
    torch.save(s.state_dict(), tmp_path / "scaler.pt")
    t = DynamicLossScaler(growth_interval=7)
    t.load_state_dict(torch.load(tmp_path / "scaler.pt", weights_only=True))
    assert (t.scale, t.good_steps, t.skipped_steps) == (s.scale, s.good_steps, s.skipped_steps)
    assert t.update(True) == s.update(True) and t.scale == s.scale


def test_a_scaled_fp16_backward_keeps_gradients_that_plain_fp16_flushes_to_zero():
    """Why the scaler exists: a gradient of 1e-8 is below fp16's smallest subnormal (6e-8)."""
    w = torch.tensor([1.0], dtype=torch.float16, requires_grad=True)
    (w * 1e-8).sum().backward()
    assert w.grad.item() == 0.0
    w.grad = None
    scale = 2.0 ** 12  # a Python scalar in an fp16 product is fp16 too: 2^16 would already be inf
    (w * 1e-8 * scale).sum().backward()
    assert abs(w.grad.float().item() / scale - 1e-8) < 1e-11
