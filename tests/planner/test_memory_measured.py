"""The planner's bytes per component against the tensors one real training step holds, in one process:
several precisions (fp32; BF16 autocast, whose linears keep BF16 copies of inputs and weights; the FP8
recipe's E4M3 caches), model shapes (no query compression, no MTP, two MTP modules, softmax routing) and
optimizer settings (BF16 moments), and each activation checkpointing mode (what the checkpointed modules
keep, and the peak of recomputing one in the backward). The issue's bound is 10% per component; the activation model is
written from the code path by path, so it comes out exact here, and the bound catches drift."""
import pytest
import torch

from dsv3.parallel.mesh import Env

from tests.planner.memory_cases import compose_config, measure_step, planned, relative_errors

PLANS = {
    "fp32": [],
    "bf16 autocast, bf16 moments": ["precision=bf16", "optim.moment_dtype=bf16"],
    "fp8 recipe (emulated)": ["precision=fp8"],
    "no q compression, 2 MTP modules, softmax routing": ["model.q_lora_rank=0", "model.mtp_depth=2",
                                                          "model.score_func=softmax", "model.n_expert_groups=1",
                                                          "model.n_limited_groups=1"],
    "no MTP, no balance loss, longer sequences": ["model.mtp_depth=0", "train.balance_loss_alpha=0",
                                                  "data.seq_len=96", "train.micro_batch_size=2"],
    # activation checkpointing: the checkpointed modules' inputs, and their recomputation in the backward
    "fp32, full blocks recomputed": ["train.activation_checkpointing=full"],
    "bf16 autocast, MoE layers recomputed": ["precision=bf16", "train.activation_checkpointing=moe"],
    "fp8 recipe, attention recomputed, 2 MTP modules": ["precision=fp8", "model.mtp_depth=2",
                                                        "train.activation_checkpointing=attention"],
}


@pytest.mark.parametrize("name", list(PLANS))
def test_planner_memory_matches_a_measured_step(name):
    cfg = compose_config("data.seq_len=48", "train.global_batch_size=4", "train.micro_batch_size=2", *PLANS[name])
    measured = measure_step(cfg, Env(0, 1, 0, torch.device("cpu")))
    (plan,) = planned(cfg, 1)
    errors = relative_errors(measured, plan)
    assert max(errors.values()) <= 0.10, (name, measured, plan, errors)
