"""The parallel plan: the one interface through which the trainer runs a step, whatever the layout.

    plan = build_plan(model, cfg, env)     # applies every dimension to the built model, from outside it
    plan.build_optimizer(cfg.optim)
    parts, loads = plan.train_step(micro_batch, n_micro, mtp_weight, aux, autocast)  # forward + backward
    norm  = plan.reduce_and_clip(max_norm) # gradients of the global batch, global norm, clipping
    plan.optimizer_step(lr)
    plan.to_global / plan.to_local         # checkpoints: this rank's state <-> the plan-independent view

It is composed of one part per dimension, each in its own module, applied in a fixed order:
- `layout`: the world as pp x dp ranks (dp = edp x ep) and the process groups, made once;
- `expert_shards`: expert parallelism inside the dp ranks of each pipeline position (applied to the
  whole model first, so it holds inside every pipeline stage);
- the runner: `local_runner` (gradient accumulation) or `pipeline_plan` (cut into stages, run by a
  schedule); the F&B pairs of either overlap the expert all-to-alls (`overlap`);
- `replicas`: who holds a copy of which tensor, and the one rule that reduces gradients and router
  counts over the copies.
- `zero` (with parallel.zero > 0 or optimizer offload): DeepSpeed's ZeRO-1/2 optimizer takes over
  `reduce_and_clip`'s reduction and norm and `optimizer_step`; its optimizer's state_dict is already
  the whole per-parameter view `to_global` expects. The trainer does not change.

Gradients (the loss of a step is the mean over the dp replicas of each replica's mean loss): a
parameter's gradient is the sum over all its copies divided by dp (`replicas` says why that also
holds for expert slices). The global gradient norm is torch.nn.utils.clip_grad_norm_'s over the whole
model: the norm of the per-tensor norms in the whole model's parameter order, each tensor counted
once (by its owner) and each expert tensor's norm assembled from its slices over the EP group.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from dsv3.config.schema import Config, OptimConfig, ParallelConfig
from dsv3.model import Transformer
from dsv3.model.moe import MoE
from dsv3.model.step_aux import StepAux
from dsv3.parallel.expert_shards import ExpertShards
from dsv3.parallel.layout import Layout, make_layout
from dsv3.parallel.local_runner import LocalRunner, MicroBatch
from dsv3.parallel.mesh import Env
from dsv3.parallel.overlap import Communicator
from dsv3.parallel.pipeline.config import PAIR_SCHEDULES
from dsv3.parallel.pipeline_plan import build_pipeline
from dsv3.parallel.pipeline_runner import PipelineRunner
from dsv3.parallel.replicas import Replicas
from dsv3.parallel.zero import ZeroDataParallel
from dsv3.train.optim import DTYPES, AdamW, parameter_groups


class WholeModel:
    """What the plan needs to know of the whole model, read before any dimension cuts or slices it."""

    def __init__(self, model: Transformer):
        self.param_index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        self.moe_index = {n: i for i, (n, m) in enumerate((n, m) for n, m in model.named_modules()
                                                          if isinstance(m, MoE))}
        self.n_params = sum(p.numel() for p in model.parameters())


class Plan:
    def __init__(self, model: Transformer, layout: Layout, whole: WholeModel,
                 runner: Union[LocalRunner, PipelineRunner], experts: ExpertShards, replicas: Replicas,
                 comm: Communicator, cfg_parallel: ParallelConfig, zero: Optional[ZeroDataParallel] = None):
        self.model, self.layout, self.whole, self.cfg_parallel = model, layout, whole, cfg_parallel
        self.runner, self.experts, self.replicas, self.comm = runner, experts, replicas, comm
        self.zero = zero
        self._max_norm = 0.0
        self._memory_reported = False
        self.local_moes = [n for n, m in model.named_modules() if isinstance(m, MoE)]  # model order
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # -- where this rank's data comes from ------------------------------------------------------
    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank

    @property
    def n_params(self) -> int:
        """Parameters of the whole model, not only this rank's stages and slices."""
        return self.whole.n_params

    @property
    def n_moe_layers(self) -> int:
        return len(self.whole.moe_index)

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, micro_batch: Callable[[int], MicroBatch], n_micro: int, mtp_weight: float,
                   aux: StepAux, autocast: AbstractContextManager) -> tuple[torch.Tensor, dict]:
        """Forward and backward of this replica's n_micro micro-batches (`micro_batch(j)` loads one:
        tokens, labels, document numbers or None); gradients accumulate in `.grad`; every forward gets
        `aux.fresh()`. Returns [main CE, MTP CE, balance loss] of what this rank computed (see
        `global_loss_parts`) and the expert counts of its MoE layers (`StepAux.loads`, summed over the
        step: see `sum_router_loads`)."""
        return self.runner.train_step(micro_batch, n_micro, mtp_weight, aux, autocast)

    def global_loss_parts(self, parts: torch.Tensor) -> torch.Tensor:
        """This rank's `train_step` parts -> the global batch's means, on every rank: every (layer,
        micro-batch) was computed by one rank of each replica, so the sum over the world is dp times it."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(parts)
        return parts / self.dp

    @property
    def eval_names(self) -> list[str]:
        """The keys of `eval_sums`' figures (dsv3/train/heldout.py), the same on every rank."""
        return self.runner.eval_names

    def eval_sums(self, tokens: torch.Tensor, labels: torch.Tensor, documents: Optional[torch.Tensor],
                  autocast: AbstractContextManager) -> Optional[dict[str, torch.Tensor]]:
        """Held-out figures of one batch summed over its predictions, no backward: the main loss, and
        where the runner holds the whole model accuracy and the MTP modules' figures; None on ranks
        that compute none (not the last pipeline stage). Every rank of a replica, and of an EP group,
        must call it alike."""
        return self.runner.eval_sums(tokens, labels, documents, autocast)

    @torch.no_grad()
    def reduce_and_clip(self, max_norm: float, grad_scale: float = 1.0) -> torch.Tensor:
        """Turn each rank's gradients into those of the global batch's mean loss; return the global
        gradient norm and scale the gradients to at most `max_norm` when it is > 0. `grad_scale`: the
        factor the backward put on every gradient (fp16's loss scale), divided out here, in the same
        multiplication as the clipping; the norm returned is the unscaled one. Under ZeRO the scaling
        happens on the partitions, in `optimizer_step` (fp16 is refused with ZeRO by the config rules)."""
        if self.zero is not None:
            assert grad_scale == 1.0, "ZeRO with a loss scale: refused by dsv3/parallel/config_rules.py"
            self._max_norm = max_norm
            return self.zero.reduce_and_norm(reduced_in_backward=self.layout.pp == 1)
        self.replicas.reduce_gradients(self.model.named_parameters())
        grads = {n: p.grad for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None}
        norms = {n: torch.linalg.vector_norm(g) for n, g in grads.items() if n not in self.experts.names}
        norms.update({n: s.sqrt() for n, s in self.experts.squared_norms(grads).items()})
        total = torch.linalg.vector_norm(self._whole_model_vector(self.whole.param_index, norms)) / grad_scale
        coeff = None
        if max_norm > 0:
            coeff = (max_norm / (total + 1e-6)).clamp(max=1.0)   # as torch.nn.utils.clip_grad_norm_
        if grad_scale != 1.0:
            coeff = (1.0 if coeff is None else coeff) / grad_scale
        if coeff is not None:
            for g in grads.values():
                g.mul_(coeff)
        return total

    def build_optimizer(self, o: OptimConfig) -> torch.optim.Optimizer:
        if self.zero is not None:
            self.optimizer = self.zero.build_optimizer(o)
            return self.optimizer
        self.optimizer = AdamW(parameter_groups(self.model, o.weight_decay, o.layer_lr_decay), lr=o.lr,
                               betas=o.betas, eps=o.eps, moment_dtype=DTYPES[o.moment_dtype])
        return self.optimizer

    def optimizer_step(self, lr: float) -> None:
        if self.zero is not None:
            self.zero.step(lr, self._max_norm)
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_metrics(self) -> dict[str, float]:
        """What the plan measured during the last step, for the metrics log: the expert all-to-alls'
        time from issue to completion and the part of it no computation hid (exposed), in seconds;
        the same for those inside F&B pairs (the ones the overlap can hide)."""
        out: dict = {}
        if not self._memory_reported:   # once, after the first step created the optimizer state
            self._memory_reported = True
            out["optim_state_bytes"] = _per_rank(self.optimizer_state_bytes())
            if self.zero is not None:
                out["master_weight_bytes"] = _per_rank(sum(t.numel() * t.element_size()
                                                           for t in self.zero.master_tensors()))
        stats = self.comm.take_stats()
        if not stats.calls:
            return out
        out.update(a2a_s=stats.in_flight_s, a2a_exposed_s=stats.exposed_s)
        if stats.pair_calls:
            out.update(a2a_pair_s=stats.pair_in_flight_s, a2a_pair_exposed_s=stats.pair_exposed_s)
        return out

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds, summed over the tensors themselves: AdamW's moments
        and step counts (under ZeRO those of its partitions, wherever they live; its fp32 master-weight
        partitions are reported apart, as `master_weight_bytes`)."""
        if self.zero is not None:
            tensors = self.zero.state_tensors()
        else:
            tensors = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        lay, p = self.layout, self.cfg_parallel
        segments = f"; each sequence in {p.seq_chunks} segments" if p.pp_schedule == "seq1f1b" else ""
        parts = [f"pp={lay.pp} ({p.pp_schedule}{segments})" if lay.pp > 1 else None, f"dp={lay.dp}",
                 f"ep={lay.ep}" if lay.ep > 1 else None,
                 f"F&B overlap {'on' if self.comm.overlap else 'off'}" if lay.ep > 1 else None,
                 self.zero.describe() if self.zero is not None else None]
        return " x ".join(x for x in parts[:3] if x) + "".join(f", {x}" for x in parts[3:] if x)

    # -- router statistics --------------------------------------------------------------------------
    def sum_router_loads(self, loads: torch.Tensor) -> None:
        """Expert counts of this rank's MoE layers ([layers, experts], model order) summed over every
        rank that routed tokens through the same layer, for the aux-loss-free bias update."""
        self.replicas.sum_rows(self.local_moes, loads)

    def all_layers(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layer values of this rank's MoE layers -> those of every MoE layer of the model."""
        return self._whole_model_vector(self.whole.moe_index, dict(zip(self.local_moes, values)))

    def _whole_model_vector(self, index: dict[str, int], values: dict[str, torch.Tensor]) -> torch.Tensor:
        """A vector over the whole model (positions `index`): each value placed by its owner only,
        summed over the pipeline ranks (x + 0 = x: exact). Collective over the pipeline group."""
        device = next(self.model.parameters()).device
        vec = torch.zeros(len(index), dtype=torch.float32, device=device)
        owned = [(index[n], v) for n, v in values.items() if self.replicas.is_owner(n)]
        if owned:
            vec[torch.tensor([i for i, _ in owned], device=device)] = torch.stack([v.float() for _, v in owned])
        pp_group = self.layout.group("pp")
        if pp_group is not None:
            dist.all_reduce(vec, group=pp_group)
        return vec

    # -- checkpoints ----------------------------------------------------------------------------------
    def to_global(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """This rank's state dicts -> the plan-independent view DCP saves and loads (global names
        already; expert slices as DTensors of the global shape). The inputs are left alone."""
        return self.experts.to_global(model_sd, optim_sd)

    def to_local(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Inverse of `to_global` (after a load filled the global view in place)."""
        return self.experts.to_local(model_sd, optim_sd)


def _per_rank(value: int) -> list[int]:
    """`value` of every rank, in rank order (collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def build_plan(model: Transformer, cfg: Config, env: Env) -> Plan:
    """Apply `cfg.parallel` to a built, initialized model (weights loaded, optimizer not made yet)."""
    layout = make_layout(cfg.parallel, env)
    whole = WholeModel(model)
    holders_of: Callable[[str], tuple[int, ...]] = lambda name: (0,)  # noqa: E731
    comm = Communicator(overlap=overlap_enabled(cfg))
    experts = ExpertShards.apply(model, cfg, layout, comm, env.device)   # before the cut: inside every stage
    if layout.pp > 1:
        runner, stage_layout = build_pipeline(model, cfg, layout, comm)
        holders_of = stage_layout.holders
    else:
        runner = LocalRunner(model, env.device, comm)
    names = list(whole.param_index) + list(whole.moe_index)
    holders = {n: holders_of(n) for n in names}
    replicas = Replicas(holders, experts.names, layout)
    zero = None
    if cfg.parallel.zero > 0 or cfg.parallel.offload_optimizer:
        zero = ZeroDataParallel(model, layout, holders, experts.names, cfg.parallel)
        if layout.pp == 1:
            runner.sync = zero
    return Plan(model, layout, whole, runner, experts, replicas, comm, cfg.parallel, zero)


def overlap_enabled(cfg: Config) -> bool:
    """parallel.overlap, with null meaning: on wherever there is something to overlap (expert
    parallelism, and F&B pairs: DualPipe's, DualPipeV's, or the accumulation's without a pipeline).
    Validation refuses `true` where there is not."""
    return overlap_enabled_for(cfg.parallel)


def overlap_enabled_for(p: ParallelConfig) -> bool:
    if p.overlap is not None:
        return bool(p.overlap)
    return p.ep > 1 and (p.pp == 1 or p.pp_schedule in PAIR_SCHEDULES)


