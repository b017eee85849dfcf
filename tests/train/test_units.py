"""Schedules, optimizer, balancing and checkpoint mechanics, each against its definition."""
import math
import os

import pytest
import torch

from dsv3.config.schema import ModelConfig, OptimConfig, TrainConfig
from dsv3.model import Transformer, init_weights
from dsv3.train import schedules
from dsv3.train.balance import update_router_biases
from dsv3.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dsv3.train.optim import AdamW, parameter_groups


def test_lr_schedule_has_the_v3_shape():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, constant_steps=5, decay_steps=20, tail=[[3, 0.05], [2, 0.02]])
    lr = [schedules.learning_rate(s, o) for s in range(45)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warmup
    assert all(x == 1.0 for x in lr[10:16])                            # constant
    assert lr[25] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 10 / 20)))  # cosine
    assert all(a >= b for a, b in zip(lr[15:35], lr[16:35]))           # decreasing
    assert lr[35:38] == [0.05] * 3 and lr[38:40] == [0.02] * 2 and lr[44] == 0.02  # tails, then held


def test_batch_ramp_is_linear_in_samples_and_aligned():
    t = TrainConfig(global_batch_size=64, batch_ramp_start=16, batch_ramp_samples=1000)
    assert schedules.global_batch_size(0, t, 8) == 16
    assert schedules.global_batch_size(500, t, 8) == 40
    assert schedules.global_batch_size(510, t, 8) == 40  # rounded down to a multiple of 8
    assert schedules.global_batch_size(1000, t, 8) == 64


def test_lambda_and_gamma_switch_at_their_steps():
    t = TrainConfig(mtp_loss_weight=0.3, mtp_loss_weight_late=0.1, mtp_loss_weight_switch_step=5,
                    bias_update_speed=0.001, bias_update_stop_step=7)
    assert [schedules.mtp_weight(s, t) for s in (4, 5)] == [0.3, 0.1]
    assert [schedules.bias_update_speed(s, t) for s in (6, 7)] == [0.001, 0.0]


def test_adamw_with_fp32_moments_is_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5)
    b = torch.nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    ours = AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(5):
        x = torch.randn(3, 7)
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_bf16_moments_are_stored_in_bf16_and_track_fp32():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    b.load_state_dict(a.state_dict())
    lo = AdamW(a.parameters(), lr=1e-3, moment_dtype=torch.bfloat16)
    hi = AdamW(b.parameters(), lr=1e-3)
    for _ in range(10):
        x = torch.randn(4, 16)
        for m, opt in ((a, lo), (b, hi)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    assert lo.state[a.weight]["exp_avg"].dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: the moments, hence the steps, agree to ~1%; 10 steps of lr 1e-3
    # move the weights by ~1e-2, so the weights agree to ~1e-4.
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=3e-4)


def test_no_weight_decay_on_norms_and_embedding():
    m = Transformer(ModelConfig())
    decay, no_decay = parameter_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all("norm" in names[id(p)] or names[id(p)] == "embed.weight" for p in no_decay["params"])
    assert any(names[id(p)] == "head.weight" for p in decay["params"])


def test_bias_update_moves_towards_balance_by_gamma():
    m = Transformer(ModelConfig(n_layers=2, n_dense_layers=1, n_routed_experts=4, n_activated_experts=1, mtp_depth=0))
    moe = m.moe_layers()[0]
    figures = update_router_biases(m.moe_layers(), {moe: torch.tensor([10.0, 2.0, 4.0, 0.0])}, 0.01)  # mean 4
    assert torch.equal(moe.gate.bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    assert figures["max_vio"] == pytest.approx((10 - 4) / 4)


def _tiny_model_and_optimizer():
    m = Transformer(ModelConfig(n_layers=2))
    init_weights(m, 0, 0.02)
    opt = AdamW(m.parameters(), lr=1e-3)
    m.losses(torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8))).main.backward()
    opt.step()
    return m, opt


def test_checkpoint_round_trip_restores_model_optimizer_and_state(tmp_path):
    m, opt = _tiny_model_and_optimizer()
    with torch.no_grad():
        m.moe_layers()[0].gate.bias.fill_(0.5)
    save_checkpoint(str(tmp_path), 7, m, opt, {"step": 7, "consumed_samples": 56}, "model: {}\n")
    m2 = Transformer(ModelConfig(n_layers=2))
    opt2 = AdamW(m2.parameters(), lr=1e-3)
    state = load_checkpoint(latest_checkpoint(str(tmp_path)), m2, opt2)
    assert state == {"step": 7, "consumed_samples": 56}
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_a_crash_mid_save_never_leaves_a_complete_looking_checkpoint(tmp_path, monkeypatch):
    m, opt = _tiny_model_and_optimizer()
    save_checkpoint(str(tmp_path), 1, m, opt, {"step": 1, "consumed_samples": 8}, "")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    # Dies after the DCP files are written, before the commit (the RNG files come last).
    monkeypatch.setattr("dsv3.train.checkpoint._rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, m, opt, {"step": 2, "consumed_samples": 16}, "")
    assert os.path.isdir(tmp_path / "step_00000002.tmp")
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000001")


def test_keep_prunes_old_checkpoints(tmp_path):
    m, opt = _tiny_model_and_optimizer()
    for step in range(1, 5):
        save_checkpoint(str(tmp_path), step, m, opt, {"step": step, "consumed_samples": 0}, "", keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]


def test_the_mfu_reference_is_the_configured_then_the_hardware_presets_then_a_measured_peak():
    from dsv3.config.schema import HardwareConfig
    from dsv3.train.perf import peak_tflops

    h800 = HardwareConfig(name="h800_2048", bf16_tflops=989.4)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert peak_tflops(gpu, torch.bfloat16, 500.0, h800) == (500.0, "logging.peak_tflops")
    assert peak_tflops(gpu, torch.bfloat16, 0.0, h800) == (989.4, "hardware.bf16_tflops of h800_2048")
    # a CPU run planned for GPUs measures the CPU, not the GPUs' datasheet
    value, source = peak_tflops(cpu, torch.float32, 0.0, h800)
    assert source.startswith("measured") and 0 < value < 989.4
