"""One training step of a plan with its memory measured by component (dsv3.planner.measure), next to what
the planner says for the same config: shared by the single- and multi-process memory tests."""
import os

import torch
from hydra import compose, initialize_config_dir

from dsv3.config.precision import autocast as precision_autocast
from dsv3.config.store import register, to_config
from dsv3.model.step_aux import StepAux
from dsv3.parallel.mesh import Env
from dsv3.parallel.plan import build_plan
from dsv3.planner.measure import ActivationPeak, grad_bytes, optimizer_bytes, param_bytes
from dsv3.planner.memory import plan_memory
from dsv3.planner.setup import plan_setup
from dsv3.train.trainer import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPONENTS = ("parameters", "gradients", "optimizer", "activations")


def compose_config(*overrides: str):
    register()
    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        return to_config(compose("config", overrides=["+experiment=moe_tiny", "checkpoint.dir=x",
                                                      "train.device=cpu", *overrides]))


def measure_step(cfg, env: Env) -> dict[str, int]:
    """Bytes this rank really holds in one optimizer step of `cfg`: the tensors themselves (see measure.py)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, env.device)
    plan = build_plan(model, cfg, env)
    optimizer = plan.build_optimizer(cfg.optim)
    t = cfg.train
    n_micro = t.global_batch_size // (t.micro_batch_size * plan.dp)
    aux = StepAux(balance_coeff=t.balance_loss_alpha / n_micro)
    gen = torch.Generator().manual_seed(1 + plan.dp_rank)
    batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
               for _ in range(n_micro)]
    autocast = precision_autocast(cfg.precision.dtype, "cpu")
    peak = ActivationPeak(model)
    for stage in getattr(plan.runner, "stages", {}).values():
        if stage.carry is not None:      # Seq1F1B: key/value gradients waiting for their segment's backward
            peak.add_source(stage.carry.pending_grad_bytes)
            peak.add_source(lambda carry=stage.carry: peak.uncounted(carry.carried()))
            grads = stage.carry.grads   # ... the most of them just before a backward takes its share

            def sampled(mb, grads=grads):
                peak.sample()
                return grads(mb)
            stage.carry.grads = sampled
    with peak:
        plan.train_step(lambda j: (batches[j][:, :-1], batches[j][:, 1:], None), n_micro, 0.3, aux, autocast)
    grads = grad_bytes(model)
    plan.reduce_and_clip(cfg.optim.grad_clip)
    plan.optimizer_step(1e-3)
    return {"parameters": param_bytes(model), "gradients": grads, "optimizer": optimizer_bytes(optimizer),
            "activations": peak.peak, "pp_rank": plan.layout.pp_rank}


def planned(cfg, world_size: int) -> list[dict[str, int]]:
    """The planner's bytes per pipeline rank, by the same components."""
    return [{"parameters": r.params, "gradients": r.grads, "optimizer": r.optimizer, "activations": r.activations}
            for r in plan_memory(cfg, plan_setup(cfg, world_size, "cpu"))]


def relative_errors(measured: dict[str, int], plan: dict[str, int]) -> dict[str, float]:
    return {k: abs(plan[k] - measured[k]) / measured[k] for k in COMPONENTS}
