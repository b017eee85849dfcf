"""The pipeline-parallel part of the plan: world = pp x dp, rank = pp_rank * dp + dp_rank.

Each rank cuts the model to its stages (`model_stages.cut_model`), runs them through the executor
(`pipeline_runner`), and reduces what several ranks hold by global name (`replicas`): gradients
over the copies of each parameter and its data-parallel replicas; router expert counts over the
same ranks (each MoE layer lives on one stage, or on two mirrored ones under DualPipe). Global
figures (gradient norm, MaxVio, parameter count) are assembled over the pipeline ranks counting a
replicated tensor once, in the whole model's order, so they are computed exactly as with pp = 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config.schema import Config
from dsv3.model import Transformer
from dsv3.model.moe import MoE
from dsv3.parallel.mesh import Env
from dsv3.parallel.model_stages import StageLayout, StepContext, cut_model
from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline_runner import PipelineRunner
from dsv3.parallel.replicas import Replicas


class PipelinePlan:
    """What the trainer needs of the pipeline layout besides running steps (`runner`)."""

    def __init__(self, runner: PipelineRunner, replicas: Replicas, pp_group: dist.ProcessGroup,
                 param_index: dict[str, int], moe_index: dict[str, int], n_params: int,
                 local_moes: list[str]):
        self.runner, self.replicas, self.pp_group = runner, replicas, pp_group
        self.param_index, self.moe_index, self.n_params = param_index, moe_index, n_params
        self.local_moes = local_moes   # this rank's MoE layers in model order (= Transformer.moe_layers)

    def reduce_gradients(self, model: nn.Module) -> None:
        self.replicas.reduce_gradients(model.named_parameters())

    def _whole_model_vector(self, index: dict[str, int], values: dict[str, torch.Tensor]) -> torch.Tensor:
        """A vector over the whole model (positions `index`): each value placed by its owner only,
        summed over the pipeline ranks (x + 0 = x: exact). Collective over the pipeline group."""
        device = self.runner.device
        vec = torch.zeros(len(index), dtype=torch.float32, device=device)
        owned = [(index[n], v) for n, v in values.items() if self.replicas.is_owner(n)]
        if owned:
            vec[torch.tensor([i for i, _ in owned], device=device)] = torch.stack([v.float() for _, v in owned])
        dist.all_reduce(vec, group=self.pp_group)
        return vec

    @torch.no_grad()
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole model: the norm of the per-tensor norms,
        in the whole model's parameter order; then every local copy is scaled alike."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        norms = {n: torch.linalg.vector_norm(p.grad) for n, p in params.items()}
        total = torch.linalg.vector_norm(self._whole_model_vector(self.param_index, norms))
        if max_norm > 0:
            coeff = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in params.values():
                p.grad.mul_(coeff)
        return total

    def sum_router_loads(self, loads: torch.Tensor) -> None:
        """Expert counts of this rank's MoE layers (rows, model order) summed over their copies."""
        self.replicas.sum_rows(self.local_moes, loads)

    def all_layers(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layer values of this rank's MoE layers -> the whole model's, in model order."""
        return self._whole_model_vector(self.moe_index, dict(zip(self.local_moes, values)))


def apply_pipeline(model: Transformer, cfg: Config, env: Env, dp: int) -> PipelinePlan:
    """Cut `model` (built and initialized whole) to this rank's stages and set up their execution."""
    from torch.distributed.device_mesh import init_device_mesh

    p, m = cfg.parallel, cfg.model
    mesh = init_device_mesh(env.device.type, (p.pp, dp), mesh_dim_names=("pp", "dp"))
    pp_rank, pp_group = mesh.get_local_rank("pp"), mesh.get_group("pp")
    layout = StageLayout(p.pp_schedule, p.pp, m.n_layers, m.mtp_depth)
    # Everything about the whole model is read before the cut.
    param_names = [n for n, _ in model.named_parameters()]
    moe_names = [n for n, mod in model.named_modules() if isinstance(mod, MoE)]
    n_params = sum(t.numel() for t in model.parameters())
    holders = {n: layout.holders(n) for n in param_names + moe_names}
    replicas = Replicas(holders, pp_rank, mesh.get_local_rank("dp"), dp)

    ctx = StepContext()
    stages = cut_model(model, layout, pp_rank, ctx)
    microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    schedule = build_schedule(p.pp_schedule, p.pp, microbatches)
    act_shape = (cfg.train.micro_batch_size, cfg.data.seq_len, m.dim)
    runner = PipelineRunner(schedule, stages, ctx, pp_rank, pp_group, act_shape, env.device)
    local_moes = [n for n, mod in model.named_modules() if isinstance(mod, MoE)]
    return PipelinePlan(runner, replicas, pp_group, {n: i for i, n in enumerate(param_names)},
                        {n: i for i, n in enumerate(moe_names)}, n_params, local_moes)
