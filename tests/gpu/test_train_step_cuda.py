"""One training step of `moe_small` on the GPU, in bf16, fp16 (loss-scaled) and FP8, against the same step in fp32 on
the CPU: the same initial weights (built on the CPU from the seed, then moved), the same batch.

What must agree, and why these bands: bf16 autocast rounds every matmul input to 8 bits of mantissa
(2^-9 relative), FP8 E4M3 to 4 (2^-5, with per-tile scales); both accumulate in fp32. The loss is a
mean over 2048 tokens, so its relative error is far below the per-element one: 1% (bf16) and 2%
(FP8). Gradients are compared by direction (cosine) and size (norm), because a token whose top-k
tie breaks differently moves a few expert gradients wholesale. The FP8 recipe's own gradient error
is large: its exact CPU emulation measures a cosine of 0.968 with fp32 on this very step (the H200
gave 0.9675), hence 0.95; bf16 measures 0.998 on the CPU, hence 0.99. After one AdamW step both losses
must have fallen by about the same amount. The bands are loose enough for rounding and tight enough
to catch a wrong kernel: an expert GEMM dropped, a transposed weight or a wrong scale moves the loss
by tens of percent and the gradient cosine far below 0.95.
"""
import os

import pytest
import torch
from conftest import DEVICE, DRY_RUN, needs_fp8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENT = "moe_tiny" if DRY_RUN else "moe_small"


def _config(precision: str, kernels: str):
    from hydra import compose, initialize_config_dir

    from dsv3.config.store import register, to_config
    register()
    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        return to_config(compose("config", overrides=[f"+experiment={EXPERIMENT}", "checkpoint.dir=x",
                                                      f"precision={precision}", f"kernels.grouped_gemm={kernels}"]))


def _step(precision: str, device: torch.device, kernels: str = "auto"):
    """Loss, gradients (flattened, fp32, on the CPU) and the loss after one AdamW step."""
    from dsv3.config.precision import autocast as precision_autocast
    from dsv3.train.optim import AdamW, parameter_groups
    from dsv3.train.trainer import build_model
    cfg = _config(precision, kernels)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    model.train()
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.model.vocab_size, (4, cfg.data.seq_len + 1), generator=g).to(device)
    autocast = precision_autocast(precision, device.type)  # the trainer's (fp8 on CPU: fp32, the emulation)
    scale = 1024.0 if precision == "fp16" else 1.0  # fp16's loss scale, divided out of the gradients
    opt = AdamW(parameter_groups(model, 0.1), lr=1e-3)

    def loss_of():
        with autocast:
            parts = model.losses(batch[:, :-1], batch[:, 1:])
            return parts.main + 0.3 * torch.stack(parts.mtp).mean()

    loss = loss_of()
    (loss * scale).backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(scale)
    grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = loss_of().item()
    return loss.item(), grads, after


@pytest.fixture(scope="module")
def fp32_cpu():
    return _step("fp32", torch.device("cpu"), "torch")


def _compare(got, want, loss_band: float, min_cos: float, norm_band: float):
    (loss, grads, after), (loss_ref, grads_ref, after_ref) = got, want
    assert abs(loss - loss_ref) <= loss_band * loss_ref, f"loss {loss:.5f} vs fp32 CPU {loss_ref:.5f}"
    cos = torch.nn.functional.cosine_similarity(grads.double(), grads_ref.double(), dim=0).item()
    assert cos >= min_cos, f"gradient cosine {cos:.4f} < {min_cos}"
    ratio = grads.norm().item() / grads_ref.norm().item()
    assert abs(ratio - 1) <= norm_band, f"gradient norm ratio {ratio:.4f}"
    fell, fell_ref = loss - after, loss_ref - after_ref
    assert fell > 0 and abs(fell - fell_ref) <= 0.25 * fell_ref + loss_band * loss_ref, \
        f"one step lowered the loss by {fell:.4f}, fp32 CPU by {fell_ref:.4f}"


def test_bf16_step_on_gpu_matches_fp32_on_cpu(fp32_cpu):
    _compare(_step("bf16", DEVICE), fp32_cpu, loss_band=0.01, min_cos=0.99, norm_band=0.03)


def test_fp16_step_on_gpu_matches_fp32_on_cpu(fp32_cpu):
    # fp16 keeps 11 bits of mantissa (bf16: 8) under a loss scale: at least bf16's bands
    _compare(_step("fp16", DEVICE), fp32_cpu, loss_band=0.01, min_cos=0.99, norm_band=0.03)


@needs_fp8
def test_fp8_step_on_gpu_matches_fp32_on_cpu(fp32_cpu):
    _compare(_step("fp8", DEVICE), fp32_cpu, loss_band=0.02, min_cos=0.95, norm_band=0.06)
