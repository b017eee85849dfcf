"""The expert-parallel dimension of a plan: every MoE layer's routed experts split into `ep`
contiguous slices over an EP group (`layout.Layout`), tokens exchanged by the dispatcher.

Applied to the whole model before a pipeline cut, so every stage's MoE layers use the EP group of
the rank's pipeline position. What the rest of the plan needs to know: the global names of the
sliced parameters (their gradients are reduced over the EDP group, `replicas`; their norms summed
over the EP group), and how they look in a checkpoint: DTensors of the global shape, sharded on
dim 0 over "ep" and replicated over "edp", so DCP reshards them across any plan.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config.schema import Config, ParallelConfig
from dsv3.model.moe import Experts, MoE
from dsv3.parallel.ep_transport import gpus_reach_each_other, local_world_size, make_transport, resolve_transport
from dsv3.parallel.expert_parallel import ExpertParallelDispatcher
from dsv3.parallel.layout import Layout
from dsv3.parallel.overlap import Communicator

log = logging.getLogger(__name__)


class ExpertShards:
    """Which parameters are expert slices, and their checkpoint view. With ep = 1 there are none and
    every method is the identity."""

    def __init__(self, layout: Layout, names: set[str]):
        self.layout, self.names = layout, names

    @classmethod
    def apply(cls, model: nn.Module, cfg: Config, layout: Layout, comm: Communicator,
              device: torch.device) -> "ExpertShards":
        if layout.ep == 1:
            return cls(layout, set())
        ep_group = layout.group("ep")
        fp8 = cfg.precision.dtype == "fp8"  # FP8 dispatch goes with the FP8 recipe (DeepSeek-V3 §3.3)
        # One transport per EP group (its exchanges are numbered), shared by every MoE layer of the rank's
        # stages; its waits go through `comm`, so that F&B pairs overlap them.
        transport = comm.wrap(_make_transport(cfg.parallel, ep_group, device, layout))
        names: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, Experts):
                names |= _keep_slice(module, name, layout.ep_rank, layout.ep)
            elif isinstance(module, MoE):
                module.dispatcher = ExpertParallelDispatcher(ep_group, cfg.model.n_routed_experts,
                                                             align=cfg.parallel.expert_align, fp8=fp8,
                                                             transport=transport)
        return cls(layout, names)

    @torch.no_grad()
    def squared_norms(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Squared L2 norm of each whole expert tensor, from this rank's slices of their gradients:
        summed over the EP group, whose ranks hold disjoint slices (one collective)."""
        names = sorted(n for n in grads if n in self.names)
        if not names:
            return {}
        squares = torch.stack([grads[n].float().square().sum() for n in names])
        dist.all_reduce(squares, group=self.layout.group("ep"))
        return dict(zip(names, squares))

    # -- checkpoints ----------------------------------------------------------------------------
    def to_global(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Copies of the state dicts with this rank's expert slices (weights and their optimizer moments)
        as DTensors of the global shape. The inputs are left alone: they share the optimizer's state."""
        if not self.names:
            return model_sd, optim_sd
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = self.layout.expert_mesh()

        def wrap(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            if t.shape != like.shape:  # the scalar step count
                return t
            return DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False)

        return self._map(model_sd, optim_sd, wrap)

    def to_local(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Inverse of `to_global` (after a load filled the DTensors in place)."""
        if not self.names:
            return model_sd, optim_sd
        from torch.distributed.tensor import DTensor

        return self._map(model_sd, optim_sd, lambda t, like: t.to_local() if isinstance(t, DTensor) else t)

    def _map(self, model_sd: dict, optim_sd: dict, fn: Callable) -> tuple[dict, dict]:
        # optim_sd is flattened by parameter name (dsv3.train.checkpoint): "state.<name>.exp_avg", ...
        model_sd, optim_sd = dict(model_sd), dict(optim_sd)
        for name in self.names & set(model_sd):   # a pipeline rank holds its stages' experts only
            weight = model_sd[name]
            model_sd[name] = fn(weight, weight)
            prefix = f"state.{name}."
            for key in [k for k in optim_sd if k.startswith(prefix)]:
                if torch.is_tensor(optim_sd[key]):
                    optim_sd[key] = fn(optim_sd[key], weight)
        return model_sd, optim_sd


def _make_transport(p: ParallelConfig, group: dist.ProcessGroup, device: torch.device, layout: Layout):
    """`parallel.ep_transport` for this EP group (auto: direct when the group lies inside a node)."""
    kind, why = resolve_transport(p.ep_transport, p.ep, local_world_size())
    if kind == "direct" and p.ep_transport == "auto" and device.type == "cuda":
        # Not chosen for the user on GPUs until it has run on one: its CUDA IPC buffers and flag protocol
        # are compiled and tested on CPU only. `parallel.ep_transport=direct` asks for it explicitly.
        kind, why = "all_to_all", ("auto: the direct transport is not yet measured on a GPU "
                                   "(parallel.ep_transport=direct to use it)")
    if kind == "direct" and device.type == "cuda" and not gpus_reach_each_other(group, device):
        raise ValueError("parallel.ep_transport=direct: the GPUs of an EP group cannot access each other's "
                         "memory (no peer access); use parallel.ep_transport=all_to_all")
    if dist.get_rank() == 0:
        log.info("expert parallelism: ep=%d, tokens move by %s (%s)", p.ep, kind, why)
    return make_transport(kind, group, device)


@torch.no_grad()
def _keep_slice(experts: Experts, name: str, ep_rank: int, ep: int) -> set[str]:
    """Keep the contiguous slice of experts of `ep_rank`. Slicing the initialized weights gives the
    single-process values whatever produced them (init is seeded per global expert, so re-initializing
    the slice would too, but slicing also keeps weights loaded before the plan, e.g. checkpoint.init_from)."""
    if experts.expert_offset != 0:
        raise ValueError(f"{name}: the experts are already a slice (expert_offset={experts.expert_offset})")
    n_local = experts.w13.shape[0] // ep
    lo = ep_rank * n_local
    kept = set()
    for pname, param in list(experts.named_parameters(recurse=False)):
        setattr(experts, pname, nn.Parameter(param[lo:lo + n_local].clone(), requires_grad=param.requires_grad))
        kept.add(f"{name}.{pname}")
    experts.expert_offset = lo
    return kept
