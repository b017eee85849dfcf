"""The dsv3 Transformer cut into pipeline stages (stages are slices of one module list: docs/architecture.md).

Every rank builds and initializes the whole model (init is by global name), then `cut_model` keeps
the modules of the stages the schedule puts on it and deletes the others. Parameter names stay
global ("layers.7.attn.wq_a.weight"), so the optimizer, initialization, and DCP checkpoints need
no translation, and a checkpoint written under one pipeline layout loads under any other.

Stage s of S holds the layers `layout.ranges[s]`; stage 0 also the embedding; the last stage the
final norm, the output head and the MTP modules, and the embedding again, because MTP embeds the
tokens it predicts from (V3 report §2.2: MTP shares the embedding and the head with the main
model). A module held by several ranks (that embedding; DualPipe's two copies of every stage) is
a replica: `StageLayout.holders` says who holds what, and dsv3.parallel.replicas reduces them.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.model import Transformer
from dsv3.model.moe import MoE
from dsv3.model.step_aux import StepAux, add_loads
from dsv3.parallel.pipeline.executor import Stage
from dsv3.parallel.pipeline.partition import n_stages, partition_layers, rank_stages
from dsv3.train.recompute import recomputes


class StageLayout:
    """Which layers each stage holds and which stages each pipeline rank holds.

    The last stage counts `mtp_depth` layer-equivalents more when balancing (an MTP module is a
    transformer block plus a projection, and it runs the output head once more); the embedding
    costs a lookup and counts nothing.
    """

    def __init__(self, schedule: str, pp: int, n_layers: int, mtp_depth: int):
        self.schedule, self.pp, self.n_layers, self.mtp_depth = schedule, pp, n_layers, mtp_depth
        self.n_stages = n_stages(schedule, pp)
        self.ranges = partition_layers(n_layers, self.n_stages, 0.0, float(mtp_depth))
        self._holders: dict[str, tuple[int, ...]] = {}
        for rank in range(pp):
            for module in sorted(self.modules_of_rank(rank)):
                self._holders[module] = self._holders.get(module, ()) + (rank,)

    def stages_of(self, rank: int) -> list[int]:
        return rank_stages(self.schedule, self.pp, rank)

    def modules_of_stage(self, stage: int) -> list[str]:
        """Top-level module names of the model that the stage runs ("embed", "layers.3", ...)."""
        names = [f"layers.{i}" for i in self.ranges[stage]]
        if stage == 0:
            names.insert(0, "embed")
        if stage == self.n_stages - 1:
            names += ["norm", "head", "mtp"] + (["embed"] if self.mtp_depth > 0 else [])
        return names

    def modules_of_rank(self, rank: int) -> set[str]:
        return {name for s in self.stages_of(rank) for name in self.modules_of_stage(s)}

    def holders(self, tensor_name: str) -> tuple[int, ...]:
        """The pipeline ranks holding a copy of the parameter, buffer or submodule `tensor_name`."""
        parts = tensor_name.split(".")
        module = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        if module not in self._holders:
            raise ValueError(f"{tensor_name}: no pipeline stage holds module {module!r}")
        return self._holders[module]


@dataclass
class StepContext:
    """Shared by this rank's stage modules: what the trainer sets for a step (the precision context
    of the forwards, lambda, the `StepAux` inputs) and what the stages record in its training forwards
    (the main and MTP cross-entropies on the last stage, the balance losses and expert counts of the
    MoE layers each stage ran, from the `StepAux` each forward is handed)."""

    autocast: AbstractContextManager = field(default_factory=nullcontext)
    mtp_weight: float = 0.0
    aux: StepAux = field(default_factory=StepAux)
    start: int = 0                # position of the chunk's first token in its sequences (Seq1F1B's segments)
    main: list[torch.Tensor] = field(default_factory=list)
    mtp: list[torch.Tensor] = field(default_factory=list)
    balance: list[torch.Tensor] = field(default_factory=list)
    loads: dict[MoE, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.main.clear()
        self.mtp.clear()
        self.balance.clear()
        self.loads = {}

    def forward_aux(self, module: nn.Module) -> StepAux | None:
        """A fresh StepAux for a training forward of `module` (None otherwise: nothing to record)."""
        return self.aux.fresh() if module.training and torch.is_grad_enabled() else None

    def record(self, aux: StepAux | None, device: torch.device) -> None:
        if aux is not None:
            self.balance.append(aux.balance_sum(device))
            add_loads(self.loads, aux.loads)


class StageBody(nn.Module):
    """Layers of one stage (stage 0 embeds the token ids first): x [B, S, dim] -> h [B, S, dim]."""

    def __init__(self, model: Transformer, layers: range, first: bool, ctx: StepContext):
        super().__init__()
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.rope = model.rope
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Transformer.hidden, restricted to this stage's layers
        aux = self.ctx.forward_aux(self)
        with self.ctx.autocast:
            h = self.embed(x) if self.embed is not None else x
            start = self.ctx.start
            cos, sin = self.rope(start + h.shape[1])
            cos, sin = cos[start:], sin[start:]
            for layer in self.layers.values():
                h = layer(h, cos, sin, aux=aux)
        self.ctx.record(aux, h.device)
        return h


class HeadLoss(nn.Module):
    """The last stage's loss: main CE + mtp_weight * mean over depths of the MTP CEs, for one
    micro-batch; target = (tokens, labels). Its modules (norm, head, MTP, embedding) are
    registered here, so the executor counts their parameters as the last stage's."""

    def __init__(self, model: Transformer, ctx: StepContext):
        super().__init__()
        self.norm, self.head, self.mtp, self.embed = model.norm, model.head, model.mtp, model.embed
        self._model = [model]   # the model's own loss code (not a submodule: its other stages are not ours)
        self.ctx = ctx

    def forward(self, h: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`h` holds positions ctx.start.. of the sequences `target` = (tokens, labels): all of them, or a
        Seq1F1B segment of L. A segment's losses are weighed so that their mean over the sequence's N
        segments is the sequence's: a mean CE (every label counts, pretraining) as it is for the main
        head (N equal parts), and times (its positions) * N / (the sequence's S-k) for MTP depth k (the
        last segment has k fewer); a CE summed over the counted labels and divided by the StepAux's
        `loss_normalizer` (SFT) times N."""
        tokens, labels = target
        model, start, length, seq = self._model[0], self.ctx.start, h.shape[1], tokens.shape[1]
        aux = self.ctx.forward_aux(self)
        with self.ctx.autocast:
            main = model.main_loss(h, labels[:, start:start + length], aux)
            mtp_losses = model.mtp_losses(h, tokens, labels, aux=aux, start=start)
        if length < seq:
            n = seq // length
            if aux is not None and aux.loss_normalizer is not None:
                main, mtp_losses = main * n, [x * n for x in mtp_losses]
            else:
                mtp_losses = [x * (min(length, seq - k - start) * n / (seq - k)) for k, x in enumerate(mtp_losses, 1)]
        mtp = torch.stack(mtp_losses).mean() if mtp_losses else torch.zeros((), device=h.device)
        if aux is not None:
            self.ctx.main.append(main.detach().float())
            self.ctx.mtp.append(mtp.detach().float())
        self.ctx.record(aux, h.device)
        return (main + self.ctx.mtp_weight * mtp) * (aux.grad_scale if aux is not None else 1.0)

    def main_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The evaluation loss: next-token CE of the main head only."""
        with self.ctx.autocast:
            return self._model[0].main_loss(h, labels)


@torch.no_grad()
def cut_model(model: Transformer, layout: StageLayout, rank: int, ctx: StepContext) -> list[Stage]:
    """Delete from `model` what pipeline rank `rank` does not hold; return its executor Stages."""
    keep = layout.modules_of_rank(rank)
    for i in range(layout.n_layers):
        if f"layers.{i}" not in keep:
            del model.layers[str(i)]
    for name in ("embed", "norm", "head", "mtp"):
        if name not in keep:
            setattr(model, name, None)
    stages, last = [], layout.n_stages - 1
    for s in layout.stages_of(rank):
        body = StageBody(model, layout.ranges[s], s == 0, ctx)
        head = HeadLoss(model, ctx) if s == last else None
        stages.append(Stage(s, body, head, recomputes=recomputes(body) or (head is not None and recomputes(head))))
    return stages
