"""The parallel plan: applied to a built model from outside it, before the optimizer is made.

Expert parallelism lives inside the data-parallel ranks, as in DeepSeek-V3: the dp ranks form a
(dp/ep) x ep mesh; a row ("ep", contiguous ranks) splits every MoE layer's routed experts into
contiguous slices and exchanges tokens; a column ("edp") holds replicas of the same slice. Every rank
still trains on its own share of the global batch, so an ep=N run is also N-way data parallel.

Pipeline parallelism (pp > 1) cuts the model into stages over pp ranks, each replicated over dp data-parallel
ranks; what it needs of the plan lives in `pipeline_plan.PipelinePlan`, to which the methods below defer.

Gradients (loss of the step = mean over the dp ranks of each rank's mean loss L_r):
- non-expert parameters: rank r holds dL_r/dθ; the mean over all dp ranks is dL/dθ.
- expert parameters: through the backward of the token exchange, a rank already holds the sum over
  its EP group of dL_r/dθ_e (every peer's tokens that reached its experts); summing that over the
  EDP group covers all dp ranks once, and dividing by dp (not by the EDP size) gives dL/dθ_e.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config.schema import Config
from dsv3.model.moe import Experts, MoE
from dsv3.parallel.data_parallel import average_gradients
from dsv3.parallel.ep_transport import (Transport, gpus_reach_each_other, local_world_size, make_transport,
                                        resolve_transport)
from dsv3.parallel.expert_parallel import ExpertParallelDispatcher
from dsv3.parallel.mesh import Env, all_reduce_sum
from dsv3.parallel.pipeline_plan import PipelinePlan, apply_pipeline

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the trainer asks of the parallel layout: gradient reduction, the global gradient norm, and
    the mapping between this rank's state dict and the plan-independent (global) one for checkpoints."""

    dp: int = 1
    ep: int = 1
    mesh: Optional["DeviceMesh"] = None  # ("edp", "ep") when ep > 1
    expert_params: dict[str, nn.Parameter] = field(default_factory=dict)  # name -> local slice [E/ep, ...]
    pipeline: Optional[PipelinePlan] = None  # pp > 1: this rank's stages and the rules for replicated tensors
    ep_transport: Optional[Transport] = None  # ep > 1: how the EP group's dispatchers move tokens

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("ep") if self.mesh is not None else None

    @property
    def edp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("edp") if self.mesh is not None else None

    def _split(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        expert_ids = {id(p) for p in self.expert_params.values()}
        params = [p for p in model.parameters() if p.requires_grad]
        return ([p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids])

    def reduce_gradients(self, model: nn.Module) -> None:
        """Turn each rank's gradients of its own loss into the gradient of the global-batch mean loss."""
        if self.pipeline is not None:
            return self.pipeline.reduce_gradients(model)
        dense, experts = self._split(model)
        average_gradients(dense)  # over the whole dp group (the default group while pp = 1)
        if experts:
            average_gradients(experts, group=self.edp_group, divisor=self.dp)  # module doc: why dp

    @torch.no_grad()
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the gradients (each expert slice counted once, non-expert parameters once);
        scales them to at most `max_norm` when it is > 0. Call after `reduce_gradients`."""
        if self.pipeline is not None:
            return self.pipeline.clip_grad_norm(model, max_norm)
        dense, experts = self._split(model)
        if not experts:  # no expert sharding: exactly torch's clipping (the single-process path)
            grads = [p.grad for p in dense if p.grad is not None]
            return (torch.nn.utils.clip_grad_norm_(dense, max_norm) if max_norm > 0
                    else torch.nn.utils.get_total_norm(grads))

        def sum_of_squares(params: list[nn.Parameter]) -> torch.Tensor:
            return sum((p.grad.float().square().sum() for p in params if p.grad is not None),
                       torch.zeros((), dtype=torch.float32, device=experts[0].device))

        expert_squares = sum_of_squares(experts)
        dist.all_reduce(expert_squares, group=self.ep_group)  # the EP ranks hold disjoint expert slices
        total = (sum_of_squares(dense) + expert_squares).sqrt()
        if max_norm > 0:
            coeff = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
            for p in dense + experts:
                if p.grad is not None:
                    p.grad.mul_(coeff)
        return total

    def global_numel(self, model: nn.Module) -> int:
        """Parameters of the whole model, not only this rank's slices."""
        if self.pipeline is not None:
            return self.pipeline.n_params
        local = sum(p.numel() for p in model.parameters())
        return local + (self.ep - 1) * sum(p.numel() for p in self.expert_params.values())

    def global_moe_layers(self, model: nn.Module) -> int:
        """MoE layers of the whole model, not only this rank's stages."""
        return len(model.moe_layers()) if self.pipeline is None else len(self.pipeline.moe_index)

    def sum_router_loads(self, loads: torch.Tensor) -> None:
        """Sum the expert counts of this rank's MoE layers ([layers, experts], in model order) over every
        rank that routed tokens through the same layer, for the aux-loss-free bias update."""
        if self.pipeline is not None:
            return self.pipeline.sum_router_loads(loads)
        all_reduce_sum(loads)  # every rank holds every router

    def all_layers(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layer values of this rank's MoE layers -> those of every MoE layer of the model."""
        return values if self.pipeline is None else self.pipeline.all_layers(values)

    # -- checkpoints: expert slices appear as DTensors sharded on dim 0, so DCP reshards across ep -------
    def to_global(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Copies of the state dicts with this rank's expert slices (weights and their optimizer moments)
        as DTensors of the global shape. The inputs are left alone: they share the optimizer's state."""
        if self.mesh is None:
            return model_sd, optim_sd
        from torch.distributed.tensor import DTensor, Replicate, Shard

        def wrap(t: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
            if t.shape != p.shape:  # the scalar step count
                return t
            return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)

        return self._map_experts(model_sd, optim_sd, wrap)

    def to_local(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Inverse of `to_global` (after a load filled the DTensors in place)."""
        if self.mesh is None:
            return model_sd, optim_sd
        from torch.distributed.tensor import DTensor

        return self._map_experts(model_sd, optim_sd, lambda t, p: t.to_local() if isinstance(t, DTensor) else t)

    def _map_experts(self, model_sd: dict, optim_sd: dict, fn) -> tuple[dict, dict]:
        # optim_sd is flattened by parameter name (dsv3.train.checkpoint): "state.<name>.exp_avg", ...
        model_sd, optim_sd = dict(model_sd), dict(optim_sd)
        for name, p in self.expert_params.items():
            model_sd[name] = fn(model_sd[name], p)
            prefix = f"state.{name}."
            for key in [k for k in optim_sd if k.startswith(prefix)]:
                if torch.is_tensor(optim_sd[key]):
                    optim_sd[key] = fn(optim_sd[key], p)
        return model_sd, optim_sd


def apply_parallel_plan(model: nn.Module, cfg: Config, env: Env) -> Plan:
    """Apply `cfg.parallel` to a built, initialized model (before the optimizer is made) and return the
    plan. With pp = ep = 1 the model is left unchanged (plain data parallelism over the world); with pp > 1
    it is cut to this rank's pipeline stages."""
    p = cfg.parallel
    dp = env.world_size // p.pp
    if p.pp > 1 and p.ep > 1:  # validation refuses it first
        raise NotImplementedError(f"parallel.ep={p.ep} with parallel.pp={p.pp}: expert parallelism inside "
                                  "pipeline stages is not implemented")
    if p.pp > 1:
        return Plan(dp=dp, pipeline=apply_pipeline(model, cfg, env, dp))
    if p.ep == 1:
        return Plan(dp=dp)
    if dp % p.ep:
        raise ValueError(f"parallel.ep={p.ep} must divide the data-parallel size {dp}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (dp // p.ep, p.ep), mesh_dim_names=("edp", "ep"))
    ep_rank = mesh.get_local_rank("ep")
    # FP8 dispatch goes with the FP8 recipe (DeepSeek-V3 §3.3).
    fp8 = cfg.precision.dtype == "fp8"
    kind, why = resolve_transport(p.ep_transport, p.ep, local_world_size())
    if kind == "direct" and p.ep_transport == "auto" and env.device.type == "cuda":
        # Not chosen for the user on GPUs until it has run on one: its CUDA IPC buffers and flag protocol
        # are compiled and tested on CPU only. `parallel.ep_transport=direct` asks for it explicitly.
        kind, why = "all_to_all", ("auto: the direct transport is not yet measured on a GPU "
                                   "(parallel.ep_transport=direct to use it)")
    if kind == "direct" and env.device.type == "cuda" and not gpus_reach_each_other(mesh.get_group("ep"), env.device):
        raise ValueError("parallel.ep_transport=direct: the GPUs of an EP group cannot access each other's "
                         "memory (no peer access); use parallel.ep_transport=all_to_all")
    transport = make_transport(kind, mesh.get_group("ep"), env.device)  # one per group: its exchanges are numbered
    if env.is_main:
        log.info("expert parallelism: ep=%d, tokens move by %s (%s)", p.ep, kind, why)
    plan = Plan(dp=dp, ep=p.ep, mesh=mesh, ep_transport=transport)
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            plan.expert_params.update(_keep_slice(module, name, ep_rank, p.ep))
        elif isinstance(module, MoE):
            module.dispatcher = ExpertParallelDispatcher(mesh.get_group("ep"), cfg.model.n_routed_experts,
                                                         align=p.expert_align, fp8=fp8, transport=transport)
    return plan


@torch.no_grad()
def _keep_slice(experts: Experts, name: str, ep_rank: int, ep: int) -> dict[str, nn.Parameter]:
    """Keep the contiguous slice of experts of `ep_rank`. Slicing the initialized weights gives the
    single-process values whatever produced them (init is seeded per global expert, so re-initializing
    the slice would too, but slicing also keeps weights loaded before the plan, e.g. checkpoint.init_from)."""
    if experts.expert_offset != 0:
        raise ValueError(f"{name}: the experts are already a slice (expert_offset={experts.expert_offset})")
    n_local = experts.w13.shape[0] // ep
    lo = ep_rank * n_local
    kept = {}
    for pname, param in list(experts.named_parameters(recurse=False)):
        local = nn.Parameter(param[lo:lo + n_local].clone(), requires_grad=param.requires_grad)
        setattr(experts, pname, local)
        kept[f"{name}.{pname}"] = local
    experts.expert_offset = lo
    return kept
