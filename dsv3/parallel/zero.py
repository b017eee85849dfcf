"""ZeRO data parallelism (stages 1 and 2) and optimizer CPU offload, through DeepSpeed's ZeRO optimizer.

What each rank holds: the whole weights of its stage(s) (ZeRO-1/2 do not shard weights), and 1/N of
the optimizer: the fp32 master weights and AdamW moments of one contiguous partition of each flat
parameter group, N being the group's data-parallel size: the dp ranks of the pipeline position, or
for the routed-expert slices their expert-data-parallel (EDP) group. ZeRO-1 reduces the gradients
once per step (all-reduce, then each rank keeps its partition); ZeRO-2 reduce-scatters them after
every backward (its hooks reduce buckets while the backward still runs, and each rank keeps only
its partition's gradients). After its partition's update each rank all-gathers the new weights.
With `offload_optimizer` the partitions and the update live in host memory (DeepSpeed's CPU Adam).

DeepSpeed's pieces used, and why not `deepspeed.initialize`: its engine recognizes MoE layers only
as its own `deepspeed.moe.layer.MoE` class and builds expert groups from its own rank layout, and its
pipeline engine allows only ZeRO-1. The plan already has its groups and runs its own executor, so it
hands them to DeepSpeed's ZeRO-1/2 optimizer (`DeepSpeedZeroOptimizer`, what `deepspeed.initialize`
builds for stages 1 and 2) directly and drives it like the engine does: the accumulation boundary
before each backward, the reduction epilogue after it, then norm, clipping and step.

What the plan adds around it, because DeepSpeed's data-parallel reduction knows one group per tensor:
- tensors several pipeline ranks hold (the embedding on the first and last stage, every stage twice
  under DualPipe) have their gradients summed over those pipeline ranks first (`_sum_stage_copies`),
  which is what DeepSpeed's own pipeline engine does for tied weights; their non-owner copies are
  marked `ds_pipe_replicated` so that the norm counts each tensor once;
- DeepSpeed divides every reduced gradient by the dp size and sums expert slices over their EDP group
  only: exactly the plan's rule (gradient = sum over copies / dp, dsv3/parallel/replicas.py).
The optimizer the trainer sees (`ZeroOptimizer`) is a view with the model's parameters whose
`state_dict` gathers each parameter's whole moments from the partitions and whose `load_state_dict`
scatters them back, so checkpoints keep the plan-independent layout of dsv3/train/checkpoint.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config.schema import OptimConfig, ParallelConfig
from dsv3.parallel.layout import Layout
from dsv3.train.optim import DTYPES, AdamW, decays

log = logging.getLogger(__name__)

# Gradient values per bucket: DDP's default bucket, 25 MiB of fp32 gradients. A bucket is reduced as
# soon as the backward has filled it, so a model of several buckets reduces while its backward runs;
# DeepSpeed keeps two buckets with overlap_comm (one filling, one in flight). Smaller models get one
# bucket of their own size.
BUCKET_NUMEL = 25 * 2**20 // 4
EXPERT_GROUP = "routed_experts"   # DeepSpeed's name of the expert groups (a parameter's `group_name`)
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")   # AdamW's state of one parameter


def ensure_process_group() -> None:
    """DeepSpeed's ZeRO optimizer works on process groups, also for one process (one rank of gloo)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed.comm
    import deepspeed.ops

    # DeepSpeed's shared-memory CPU op serves only its inference all-reduce, never ZeRO's collectives;
    # not building it saves a minute of compilation per machine.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                    verbose=False)


def cpu_adam_available() -> Optional[str]:
    """None if DeepSpeed's CPU Adam can be built here, else why not (no build is started)."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return f"deepspeed cannot be imported ({type(e).__name__}: {e})"
    builder = CPUAdamBuilder()
    if builder.is_compatible(verbose=False):
        return None
    return "DeepSpeed's CPUAdamBuilder reports this machine incompatible (compiler, ninja or CPU features)"


class _PipelineMpu:
    """What DeepSpeed's ZeRO optimizer asks of a model-parallel unit: the group over which per-rank
    norms and overflow flags are summed (our pipeline ranks), and that no tensor is split by tensor
    parallelism (rank 0), so every non-replicated tensor's norm counts."""

    def __init__(self, pp_group: dist.ProcessGroup, pp: int, pp_rank: int):
        self.group, self.size, self.rank = pp_group, pp, pp_rank

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_world_size(self) -> int:
        return self.size

    def get_model_parallel_rank(self) -> int:
        return self.rank

    def get_tensor_model_parallel_rank(self) -> int:
        return 0


def _make_zero_optimizer_class():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    class _Zero(DeepSpeedZeroOptimizer):
        """DeepSpeed's ZeRO-1/2 optimizer whose step reuses the global norm the plan computed (and
        logged) in `reduce_and_clip`, instead of a second round of norm collectives."""

        step_norm: Optional[torch.Tensor] = None

        def scaled_global_norm(self, norm_type=2):
            if self.step_norm is not None:
                return self.step_norm
            return super().scaled_global_norm(norm_type)

    return _Zero


@dataclass
class _Group:
    """One flat parameter group of DeepSpeed's optimizer, as this rank sees it."""

    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]           # where each parameter starts in the flat group
    partition_size: int
    process_group: Optional[dist.ProcessGroup]


class ZeroDataParallel:
    """The data-parallel dimension with ZeRO stage `p.zero` (1 or 2), optionally offloaded.

    Args:
        model: this rank's model (its stages and expert slices), weights final.
        layout: this rank's coordinates and the plan's groups.
        holders: global parameter name -> pipeline ranks holding a copy (`replicas.Replicas.holders`).
        expert_slices: global names of the routed-expert slices (split over the EP group).
        p: parallel.zero, parallel.offload_optimizer.
    """

    def __init__(self, model: nn.Module, layout: Layout, holders: dict[str, tuple[int, ...]],
                 expert_slices: set[str], p: ParallelConfig):
        ensure_process_group()
        # Offload alone runs on ZeRO-1: on one dp rank it shards nothing, and it works with pipelines.
        self.model, self.layout, self.stage = model, layout, max(p.zero, 1)
        self.offload = p.offload_optimizer
        self.named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        self.holders = holders
        self.expert_slices = {n for n, _ in self.named if n in expert_slices}
        self._make_groups()
        for name, q in self.named:
            # Not the owner of a copy another pipeline rank holds: its norm is counted there.
            q.ds_pipe_replicated = holders[name][0] != layout.pp_rank
            if name in self.expert_slices:
                q.allreduce, q.group_name = False, EXPERT_GROUP   # DeepSpeed's mark of an expert parameter
        self.zopt = None
        self.view: Optional[ZeroOptimizer] = None

    # -- groups -----------------------------------------------------------------------------------
    def _make_groups(self) -> None:
        """The dp group of this pipeline position, the EP/EDP groups, and per set of pipeline holders
        the groups of copies with the same dp rank. new_group is collective: every rank makes every
        group, in one order."""
        lay = self.layout
        world = dist.get_world_size()
        self.dp_group = dist.group.WORLD
        self.ep_group = self.edp_group = None
        self.stage_groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.mpu = None
        if world == 1:
            return
        if lay.pp > 1:
            for r in range(lay.pp):
                group = dist.new_group([lay.global_rank(r, d) for d in range(lay.dp)])
                if r == lay.pp_rank:
                    self.dp_group = group
            self.mpu = _PipelineMpu(lay.mesh.get_group("pp"), lay.pp, lay.pp_rank)
            for hs in sorted({h for h in self.holders.values() if len(h) > 1}):
                for d in range(lay.dp):
                    group = dist.new_group([lay.global_rank(h, d) for h in hs])
                    if lay.pp_rank in hs and d == lay.dp_rank:
                        self.stage_groups[hs] = group
        if lay.ep > 1:
            self.ep_group, self.edp_group = lay.mesh.get_group("ep"), lay.mesh.get_group("edp")

    # -- the optimizer --------------------------------------------------------------------------------
    def build_optimizer(self, o: OptimConfig) -> "ZeroOptimizer":
        from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig
        from deepspeed.utils.timer import NoopTimer

        groups, kinds = [], []
        for experts in (False, True):
            for decay in (True, False):
                named = [(n, q) for n, q in self.named
                         if (n in self.expert_slices) == experts and decays(n, q) == decay]
                if not named:
                    continue
                group = {"params": [q for _, q in named], "weight_decay": o.weight_decay if decay else 0.0}
                if experts:
                    group.update(moe=True, name=EXPERT_GROUP)
                groups.append(group)
                kinds.append([n for n, _ in named])
        if self.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            inner = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
        else:
            inner = AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, moment_dtype=DTYPES[o.moment_dtype])
        has_experts = bool(self.expert_slices)
        numel = sum(q.numel() for _, q in self.named)
        bucket = max(2, min(BUCKET_NUMEL, numel))
        bucket += bucket % 2
        offload = DeepSpeedZeroOffloadOptimizerConfig(device="cpu", pin_memory=False) if self.offload else None
        names = {q: n for n, q in self.named}
        self.zopt = _make_zero_optimizer_class()(
            inner, names, timers=NoopTimer(), optimizer_params={}, static_loss_scale=1.0,
            dynamic_loss_scale=False, verbose=False,
            # contiguous gradients: required for experts (their reduce-scatter runs over the EDP group
            # only through the contiguous buckets) and by offload
            contiguous_gradients=True, reduce_bucket_size=bucket, allgather_bucket_size=bucket,
            dp_process_group=self.dp_group,
            expert_parallel_group={EXPERT_GROUP: self.ep_group} if has_experts else None,
            expert_data_parallel_group={EXPERT_GROUP: self.edp_group} if has_experts else None,
            reduce_scatter=True,
            # With a pipeline the plan reduces after the schedule (the executor's split backward fills
            # some gradients outside autograd's accumulation hooks); without one, during the backward.
            overlap_comm=self.layout.pp == 1,
            offload_optimizer_config=offload, mpu=self.mpu, clip_grad=0.0,
            gradient_accumulation_dtype=torch.float32, communication_data_type=torch.float32,
            partition_grads=self.stage == 2, has_moe_layers=has_experts, check_grad_overflow=False)
        self.groups = self._describe_groups(kinds)
        self.view = ZeroOptimizer(self, groups_for_view(self.named, o.weight_decay), o)
        return self.view

    def _describe_groups(self, kinds: list[list[str]]) -> list[_Group]:
        z = self.zopt
        params = dict(self.named)
        out = []
        for i, names in enumerate(kinds):
            assert [id(params[n]) for n in names] == [id(q) for q in z.round_robin_bit16_groups[i]]
            out.append(_Group([params[n] for n in names], names, list(z.round_robin_bit16_offsets[i]),
                              int(z.partition_size[i]), z.real_dp_process_group[i]))
        return out

    # -- the step ---------------------------------------------------------------------------------------
    def before_backward(self, last: bool) -> None:
        """Before a micro-batch's backward (without a pipeline): ZeRO-1's hooks reduce during the
        last one only, ZeRO-2's during every one (into the partitioned gradients)."""
        self.zopt.set_gradient_accumulation_boundary(last)

    def after_backward(self, last: bool) -> None:
        """After a micro-batch's backward (without a pipeline): what DeepSpeed's engine does then."""
        if self.stage == 2:
            self.zopt.overlapping_partition_gradients_reduce_epilogue()
        elif last:
            self._reduce_leftovers()
            self.zopt.overlapping_partition_gradients_reduce_epilogue()

    def _reduce_leftovers(self) -> None:
        """Gradients whose accumulation hook did not fire in the reducing backward (a parameter the last
        micro-batch did not reach, or one the pipeline executor's weight-gradient pass filled in) go
        into the buckets now, in the one order every rank shares."""
        z = self.zopt
        z.setup_buckets()
        queued = {pid for bucket in z.ipg_buckets.values() for _, _, pid in bucket.params}
        for i, group in enumerate(z.bit16_groups):
            for q in group:
                pid = z.get_param_id(q)
                if q.grad is not None and not z.params_already_reduced[pid] and pid not in queued:
                    z.reduce_independent_p_g_buckets_and_remove_grads(q, i)

    @torch.no_grad()
    def reduce_and_norm(self, reduced_in_backward: bool) -> torch.Tensor:
        """The step's gradients reduced into this rank's partitions; returns the global norm."""
        z = self.zopt
        if not reduced_in_backward:   # pipeline: after the schedule (ZeRO-1 only)
            self._sum_stage_copies()
            z.set_gradient_accumulation_boundary(True)
            self._reduce_leftovers()
            z.overlapping_partition_gradients_reduce_epilogue()
        z.step_norm = None
        z.step_norm = z.scaled_global_norm()
        return z.step_norm

    def _sum_stage_copies(self) -> None:
        """Gradients of tensors several pipeline ranks hold: summed over those ranks (same dp rank)."""
        by_holders: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for name, q in self.named:
            hs = self.holders[name]
            if len(hs) > 1:
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
                by_holders.setdefault(hs, []).append(q.grad)
        for hs in sorted(by_holders):
            grads = by_holders[hs]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.stage_groups[hs])
            for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))

    def discard_gradients(self) -> None:
        """A step not applied (non-finite gradients): what the reduction put into the partitions goes,
        as in DeepSpeed's own overflow path, so that the next step starts from none."""
        z = self.zopt
        z.zero_grad(set_to_none=True)
        z._release_preflattened_grad_buffers()
        if self.offload:
            z.reset_cpu_buffers()
        else:
            for k in z.averaged_gradients:
                z.averaged_gradients[k] = None
                z.all_grad_tensors[k] = None
        z.step_norm = None

    def step(self, lr: float, max_norm: float) -> None:
        z = self.zopt
        z.clip_grad = max_norm
        z.set_lr(lr)
        z.step()
        z.step_norm = None
        z.zero_grad(set_to_none=True)

    # -- what is held ------------------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """This rank's optimizer state: the moments (and step counts) of its partitions."""
        return [t for s in self.zopt.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]

    def master_tensors(self) -> list[torch.Tensor]:
        """This rank's fp32 master-weight partitions."""
        return list(self.zopt.single_partition_of_fp32_groups)

    def describe(self) -> str:
        return f"ZeRO-{self.stage}" + (" + optimizer offload (DeepSpeed CPU Adam)" if self.offload else "")

    # -- whole tensors <-> partitions ---------------------------------------------------------------------
    def _flat_state(self, i: int) -> dict:
        """The inner optimizer's state of flat group i, created (zero) if no step ran yet."""
        flat = self.zopt.single_partition_of_fp32_groups[i]
        state = self.zopt.optimizer.state[flat]
        if not state:
            dtype = getattr(self.zopt.optimizer, "moment_dtype", flat.dtype)   # our AdamW's, or CPU Adam's fp32
            state["step"] = 0 if self.offload else torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(flat, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(flat, dtype=dtype)
        return state

    def gather(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's whole moments and step (collective over each group's dp ranks)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for i, g in enumerate(self.groups):
            state = self._flat_state(i)
            step = torch.as_tensor(float(state["step"]), dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                part = state[key]
                parts = [torch.empty_like(part) for _ in range(dist.get_world_size(g.process_group))]
                dist.all_gather(parts, part.contiguous(), group=g.process_group)
                full = torch.cat(parts)
                for name, q, offset in zip(g.names, g.params, g.offsets):
                    out.setdefault(name, {})[key] = full[offset:offset + q.numel()].view_as(q).clone()
            for name in g.names:
                out[name]["step"] = step.clone()
        return out

    def scatter(self, whole: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of `gather`: each rank keeps its partition of every group's moments."""
        for i, g in enumerate(self.groups):
            state = self._flat_state(i)
            rank = dist.get_rank(g.process_group)
            lo = rank * g.partition_size
            for key in ("exp_avg", "exp_avg_sq"):
                part = state[key]
                for name, q, offset in zip(g.names, g.params, g.offsets):
                    a, b = max(offset, lo), min(offset + q.numel(), lo + g.partition_size)
                    if a < b:
                        src = whole[name][key].reshape(-1)[a - offset:b - offset]
                        part[a - lo:b - lo].copy_(src.to(part.dtype))
            steps = {float(whole[name]["step"]) for name in g.names}
            if len(steps) > 1:
                log.warning("ZeRO keeps one step count per parameter group; the checkpoint has %s in one "
                            "group (a parameter missed steps): using the largest", sorted(steps))
            step = max(steps)
            if self.offload:
                state["step"] = int(step)
            else:
                state["step"].fill_(step)

    def refresh_master_weights(self) -> None:
        """After the model's weights were loaded: the fp32 master partitions take them again."""
        self.zopt.refresh_fp32_params()


def groups_for_view(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [q for n, q in named if decays(n, q)]
    rest = [q for n, q in named if not decays(n, q)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


class ZeroOptimizer(torch.optim.Optimizer):
    """The optimizer as the trainer and the checkpoints see it under ZeRO: the model's parameters in
    V3's groups, state_dict/load_state_dict of whole per-parameter moments (gathered from and scattered
    to DeepSpeed's partitions: collective over the data-parallel groups, every rank calls them). The
    step itself is the plan's (`Plan.optimizer_step`)."""

    def __init__(self, zero: ZeroDataParallel, groups: list[dict], o: OptimConfig):
        # AdamW's hyperparameters in every group: a checkpoint's param_groups have the same keys with
        # or without ZeRO, so either loads the other's.
        super().__init__(groups, dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=0.0))
        self.zero = zero
        # The names of each parameter's state, with no values (they live in the partitions): torch's
        # checkpoint helpers read the names, and an empty state would make them "initialize" it by stepping.
        self.state = {q: dict.fromkeys(STATE_KEYS) for g in self.param_groups for q in g["params"]}

    def step(self, closure=None):
        raise RuntimeError("under ZeRO the step is the plan's: Plan.optimizer_step(lr)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The trainer's way of not applying a step: the partitions' reduced gradients go too."""
        self.zero.discard_gradients()

    def state_dict(self) -> dict:
        whole = self.zero.gather()
        index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        names = {id(q): n for n, q in self.zero.named}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(q)] for q in g["params"]]}
                  for g in self.param_groups]
        return {"state": {index[id(q)]: whole[names[id(q)]] for g in self.param_groups for q in g["params"]},
                "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        params = [q for g in self.param_groups for q in g["params"]]
        names = {id(q): n for n, q in self.zero.named}
        # keyed by parameter name (torch's set_state_dict) or by position (Optimizer.state_dict's form)
        whole = {k if isinstance(k, str) else names[id(params[int(k)])]: s for k, s in state_dict["state"].items()}
        missing = [names[id(q)] for q in params if names[id(q)] not in whole]
        if missing:
            raise ValueError(f"the checkpoint has no optimizer state for {missing[:3]}")
        self.zero.scatter(whole)
        self.zero.refresh_master_weights()

