"""The expert-parallel plan gives the gradients of the global batch: after `reduce_and_clip`, every
rank's gradients (its expert slices, and all non-expert parameters) equal those of one process training
the whole model on the whole batch, and the norm it returns is the global norm.

Each rank trains on its own share of the global batch (an ep=N run is also N-way data parallel); the
reference model sees every share, each weighted 1/dp, as the trainer's loss is the mean over ranks.
fp32: the same sums in a different order (per-rank partial sums, all-reduces), so 1e-5.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from dsv3.config.schema import Config, ModelConfig
from dsv3.model.step_aux import StepAux
from dsv3.parallel.mesh import Env
from dsv3.parallel.plan import build_plan
from dsv3.train.trainer import build_model
from tests.parallel.distributed_testing import run_workers

TOL = dict(rtol=1e-5, atol=1e-7)
MODEL = ModelConfig(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
                    n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                    route_scale=2.5, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, max_seq_len=32, mtp_depth=1, init_std=0.1)
BATCH, SEQ = 2, 12  # sequences per rank, tokens per sequence


def share_loss(model, tokens, weight: float = 1.0):
    """weight * (CE + MTP + balance loss) of one share; the balance loss enters through its coefficient,
    as in the trainer (alpha large enough that a wrong router gradient shows)."""
    parts = model.losses(tokens[:, :-1], tokens[:, 1:], aux=StepAux(balance_coeff=0.01 * weight))
    return weight * (parts.main + 0.3 * torch.stack(parts.mtp).mean())


def plan_worker(rank: int, world: int, ep_sizes: list[int]) -> None:
    tokens = torch.randint(0, MODEL.vocab_size, (world * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    shares = tokens.split(BATCH)
    cfg = Config(model=MODEL)
    cfg.train.seed = 11

    reference = build_model(cfg, torch.device("cpu"))
    reference.train()
    for share in shares:
        share_loss(reference, share, 1 / world).backward()
    ref_params = dict(reference.named_parameters())
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref_params.values()])
    max_norm = 0.5 * ref_norm.item()  # clipping active
    torch.nn.utils.clip_grad_norm_(list(ref_params.values()), max_norm)

    for ep in ep_sizes:
        cfg.parallel = dataclasses.replace(cfg.parallel, ep=ep)
        model = build_model(cfg, torch.device("cpu"))
        plan = build_plan(model, cfg, Env(rank, world, rank, torch.device("cpu")))
        assert plan.experts.names, "the plan sliced no experts"
        model.train()
        share_loss(model, shares[rank]).backward()
        norm = plan.reduce_and_clip(max_norm)
        torch.testing.assert_close(norm, ref_norm, **TOL, msg=lambda m: f"ep={ep} rank {rank}: grad norm: {m}")

        ep_rank = rank % ep
        for name, p in model.named_parameters():
            want_param, want_grad = ref_params[name].detach(), ref_params[name].grad
            if name in plan.experts.names:
                n_local = p.shape[0]
                assert n_local * ep == want_param.shape[0]
                want_param = want_param[ep_rank * n_local:(ep_rank + 1) * n_local]
                want_grad = want_grad[ep_rank * n_local:(ep_rank + 1) * n_local]
            assert torch.equal(p.detach(), want_param), f"ep={ep} rank {rank}: {name} is not the single-process init"
            torch.testing.assert_close(p.grad, want_grad, **TOL, msg=lambda m: f"ep={ep} rank {rank}: {name}: {m}")
        dist.barrier()


@pytest.mark.parametrize("world,ep_sizes", [(2, [2]), (4, [2, 4])])
def test_plan_gradients_equal_the_single_process_global_batch_gradients(world, ep_sizes):
    """world 4 with ep=2 has expert-data-parallel replicas (the EDP reduction); ep=4 has none."""
    run_workers(plan_worker, world, ep_sizes, timeout=180)
