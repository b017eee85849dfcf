"""precision.dtype=fp16: autocast in fp16 with dynamic loss scaling (GPUs without bf16: Turing, RTX 20xx).

Checked here on CPU, where fp16 autocast runs: the scale is divided out exactly (a power-of-two scale
leaves the clipped gradients bit-identical, balance loss included); a real run overflows under a too
large initial scale, skips those steps without counting them as divergence, backs off, trains, grows
the scale again, and resumes with its scale exactly; validation explains which precision a GPU can run.
"""
import torch

from dsv3.config import ConfigError, validate
from dsv3.config.schema import Config, ModelConfig
from dsv3.model.step_aux import StepAux
from dsv3.parallel.mesh import Env
from dsv3.parallel.plan import build_plan
from dsv3.train.trainer import build_model
from tests.helpers import assert_same_losses, read_metrics, run_pretrain

MODEL = ModelConfig(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
                    n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                    route_scale=2.5, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, max_seq_len=32, mtp_depth=1, init_std=0.1)


def _clipped_grads(grad_scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = Config(model=MODEL)
    cfg.train.seed = 5
    model = build_model(cfg, torch.device("cpu"))
    plan = build_plan(model, cfg, Env(0, 1, 0, torch.device("cpu")))
    tokens = torch.randint(0, MODEL.vocab_size, (3, 2, 13), generator=torch.Generator().manual_seed(1))

    def micro_batch(j):
        return tokens[j, :, :-1], tokens[j, :, 1:], None

    aux = StepAux(balance_coeff=0.05, grad_scale=grad_scale)
    plan.train_step(micro_batch, 3, 0.3, aux, torch.autocast("cpu", enabled=False))
    norm = plan.reduce_and_clip(0.5, grad_scale=grad_scale)
    return norm, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_power_of_two_loss_scale_leaves_the_clipped_gradients_bit_identical():
    norm, grads = _clipped_grads(1.0)
    assert norm > 0.5  # clipping is active
    for scale in (2.0 ** 12, 2.0 ** -3):
        scaled_norm, scaled = _clipped_grads(scale)
        assert torch.equal(scaled_norm, norm), (scale, scaled_norm, norm)
        for name, g in grads.items():
            assert torch.equal(scaled[name], g), f"scale {scale}: {name}"
    _, wrong = _clipped_grads(3.0)  # not a power of two: equal only up to rounding, so the test can see
    assert any(not torch.equal(wrong[n], g) for n, g in grads.items())


RUN = ["+experiment=moe_tiny", "precision.dtype=fp16", "precision.loss_scale.init=1073741824",
       "precision.loss_scale.growth_interval=4", "train.max_consecutive_skips=2", "train.val_every=0",
       "train.log_every=1"]


def test_an_fp16_run_backs_off_from_overflow_trains_and_resumes_with_its_scale(tmp_path):
    whole = str(tmp_path / "whole")
    r = run_pretrain(whole, *RUN, "train.max_steps=30", "checkpoint.every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(whole)
    scales = [x["loss_scale"] for x in m]
    first = next(i for i, x in enumerate(m) if not x["overflow"])  # the leading run of overflows
    # 2^30 overflows fp16 (max 65504) here: skipped steps, each halving the scale, more of them in a row
    # than train.max_consecutive_skips (overflows are the scale's to fix, not divergence)
    assert first > 2, scales
    assert all(x["skipped"] for x in m if x["overflow"])
    assert scales[:first + 1] == [2.0 ** (30 - k) for k in range(first + 1)]
    assert m[-1]["overflows"] == sum(x["overflow"] for x in m)
    assert "fp16 gradients overflowed at loss scale" in r.stdout + r.stderr
    applied = [x for x in m if not x["skipped"]]
    assert all(torch.isfinite(torch.tensor([x["loss"], x["grad_norm"]])).all() for x in applied)
    grown = [i for i in range(first + 1, len(m)) if scales[i] > scales[i - 1]]
    assert grown, scales  # the scale doubled again after 4 good steps
    losses = [x["loss"] for x in applied]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses

    # Interrupted at step 15 and resumed: the same steps, scales included.
    split = str(tmp_path / "split")
    ckpt = f"checkpoint.dir={split}/checkpoints"
    r = run_pretrain(split, *RUN, "train.max_steps=15", "checkpoint.every=15", ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_pretrain(split, *RUN, "train.max_steps=30", "checkpoint.every=0", "train.resume=auto", ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = read_metrics(split)
    assert_same_losses(m, resumed, rtol=0.0, keys=("loss", "mtp_loss", "loss_scale", "overflows"))


def test_bf16_on_a_gpu_without_it_names_fp16_and_the_loss_scale_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cfg = Config()
    cfg.precision.dtype = "bf16"
    try:
        validate(cfg)
    except ConfigError as e:
        assert e.key == "precision.dtype" and "Tesla T4 has 7.5: use precision.dtype=fp16" in str(e), str(e)
    else:
        raise AssertionError("bf16 on compute capability 7.5 passed validation")
    cfg.precision.dtype = "fp16"
    validate(cfg)  # what the message proposes runs
    for key, value in (("min", 0.0), ("init", 0.5), ("growth_interval", 0)):
        bad = Config()
        bad.precision.dtype = "fp16"
        setattr(bad.precision.loss_scale, key, value)
        try:
            validate(bad)
        except ConfigError as e:
            assert e.key == f"precision.loss_scale.{key}", e.key
        else:
            raise AssertionError(f"precision.loss_scale.{key}={value} passed validation")
