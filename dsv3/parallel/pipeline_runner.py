"""A training step of the cut dsv3 model through the pipeline executor, and a forward-only pass.

Loss scale. The executor seeds each micro-batch's loss gradient with 1/m, which is the pp = 1
trainer's `loss / n_micro`. The MoE balance losses do not pass through the executor: each MoE
layer adds its own through an autograd side channel whose backward feeds the coefficient of the
`StepAux` its forward was handed (dsv3/model/step_aux.py), and the trainer passes alpha / m, the same
1/m share.

Overlap. With expert parallelism inside the stages, the plan passes its Communicator's `run_pair`
as the executor's F&B hook: DualPipe's pairs then run the forward chunk's MoE all-to-alls while the
backward chunk computes, and vice versa (dsv3/parallel/overlap.py).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Optional

import torch
import torch.distributed as dist

from dsv3.model.step_aux import SequenceParts, StepAux
from dsv3.model.transformer import IGNORE
from dsv3.parallel.model_stages import HeadLoss, StepContext
from dsv3.parallel.pipeline.executor import OverlapHook, PipelineExecutor, Stage
from dsv3.parallel.pipeline.schedule import Schedule
from dsv3.train.heldout import heldout_names

# (tokens [b, S], labels [b, S], document numbers: always None here, validation refuses document
# masks with pipelines, whose stages pass on activations only)
MicroBatch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class PipelineRunner:
    """This rank's stages under one schedule.

    Args:
        schedule: the schedule of every step (m = schedule.microbatches micro-batches).
        stages: the executor Stages this rank holds (`model_stages.cut_model`).
        ctx: the StepContext shared with the stage modules.
        pp_rank, group: this rank's position in the pipeline and the pipeline process group.
        act_shape: (micro-batch size, seq_len, dim) of the activations between stages.
        overlap: the executor's F&B hook (None: forward, then backward).
    """

    def __init__(self, schedule: Schedule, stages: list[Stage], ctx: StepContext, pp_rank: int,
                 group: dist.ProcessGroup, act_shape: tuple[int, int, int], device: torch.device,
                 overlap: Optional[OverlapHook] = None, seq_chunks: int = 1):
        self.schedule, self.stages, self.ctx = schedule, {s.index: s for s in stages}, ctx
        self.seq_chunks = seq_chunks    # Seq1F1B: schedule micro-batch u is segment u % N of micro-batch u // N
        self.pp_rank, self.group, self.device = pp_rank, group, device
        # The residual stream stays in the parameters' dtype (fp32 master weights): autocast lowers
        # GEMM outputs only, and the residual additions promote back.
        self.executor = PipelineExecutor(schedule, stages, act_shape=act_shape, act_dtype=torch.float32,
                                         rank=pp_rank, group=group, device=device, overlap=overlap)
        last = schedule.n_stages - 1
        self.head: Optional[HeadLoss] = self.stages[last].loss_fn if last in self.stages else None
        m = range(schedule.microbatches)
        self._first = [j for j in m if schedule.rank_of(0, j) == pp_rank]
        self._last = [j for j in m if schedule.rank_of(last, j) == pp_rank]

    def _modules(self):
        for s in self.stages.values():
            yield s.module
            if s.loss_fn is not None:
                yield s.loss_fn

    def train_step(self, micro_batch: Callable[[int], MicroBatch], n_micro: int, mtp_weight: float,
                   aux: StepAux, autocast: AbstractContextManager) -> tuple[torch.Tensor, dict]:
        """Forward and backward of the m micro-batches (gradients accumulate in `.grad`); the
        stages' forwards run in `autocast`, the MTP losses weigh `mtp_weight`, each forward gets
        `aux.fresh()` (the balance-loss coefficient, the loss normalizer). `n_micro` is the caller's m,
        which scaled that coefficient: it must be the schedule's.

        `micro_batch(j)` loads micro-batch j; it is called only for the micro-batches whose first
        or last stage runs here. Returns [main CE, MTP CE, balance loss] summed over what this rank
        computed and divided by m (summed over the pipeline ranks it is the replica's mean), and the
        expert counts of this rank's MoE layers over the step. Seq1F1B: the schedule's m micro-batches
        are the n_micro micro-batches' segments."""
        m, n = self.schedule.microbatches, self.seq_chunks
        assert n_micro * n == m, (n_micro, n, m)  # no batch ramp with pp > 1 (dsv3/parallel/config_rules.py)
        inputs: list = [None] * m
        targets: list = [None] * m
        loaded: dict[int, MicroBatch] = {}
        for u in sorted(set(self._first) | set(self._last)):
            if u // n not in loaded:
                loaded[u // n] = micro_batch(u // n)
            tokens, labels, _ = loaded[u // n]
            length = tokens.shape[1] // n
            inputs[u], targets[u] = tokens[:, u % n * length:(u % n + 1) * length], (tokens, labels)
        for mod in self._modules():
            mod.train()
        t = self.ctx
        t.clear()
        if n > 1:   # Seq1F1B: the segments' balance-loss terms add up to their sequences' (f over the whole)
            aux = StepAux(aux.balance_coeff, aux.loss_normalizer, aux.grad_scale, parts=SequenceParts())
        t.autocast, t.mtp_weight, t.aux = autocast, mtp_weight, aux
        self.executor.step(inputs, targets)
        if n > 1:   # the logged balance losses: the whole sequences', complete now (per segment: partial)
            t.balance[:] = [aux.parts.balance(self.device) * n]
        zero = torch.zeros((), device=self.device)
        # each schedule micro-batch's losses are a mean over the batch's sequences (segments: see HeadLoss)
        sums = torch.stack([torch.stack(xs).sum() if xs else zero for xs in (t.main, t.mtp, t.balance)]) / m
        loads = t.loads
        t.clear()
        return sums, loads

    @property
    def eval_names(self) -> list[str]:
        return heldout_names(None)  # the main loss only: the stages run the main model

    @torch.no_grad()
    def eval_sums(self, tokens: torch.Tensor, labels: torch.Tensor, documents: Optional[torch.Tensor],
                  autocast: AbstractContextManager) -> Optional[dict[str, torch.Tensor]]:
        """The held-out loss of one batch summed over its predictions (`eval_names`), on the rank running
        the last stage; None on the others."""
        loss = self.eval_loss(tokens, labels, documents, autocast)
        n = float((labels != IGNORE).sum())  # the labels that count (fine-tuning masks the prompt's)
        return None if loss is None else {"loss": loss.float() * n if n else loss.new_zeros(()),
                                          "count": loss.new_tensor(n)}

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, labels: torch.Tensor, documents: Optional[torch.Tensor],
                  autocast: AbstractContextManager) -> Optional[torch.Tensor]:
        """Main next-token CE of one batch through all stages (micro-batch 0's route), no backward:
        the held-out loss. Returns it on the rank running the last stage, None on the others; every
        pipeline rank of the data-parallel replica must call it with the same batch shape."""
        for mod in self._modules():
            mod.eval()
        self.ctx.autocast = autocast
        route, last = self.schedule.route(0), self.schedule.n_stages - 1
        h = tokens
        for s, rank in enumerate(route):
            if rank != self.pp_rank:
                continue
            if s > 0 and route[s - 1] != rank:
                h = torch.empty((*tokens.shape, self.executor.act_shape[-1]), dtype=torch.float32,
                                device=self.device)
                dist.recv(h, dist.get_global_rank(self.group, route[s - 1]), group=self.group)
            h = self.stages[s].module(h)
            if s == last:
                return self.head.main_loss(h, labels)
            if route[s + 1] != rank:
                dist.send(h.contiguous(), dist.get_global_rank(self.group, route[s + 1]), group=self.group)
        return None
