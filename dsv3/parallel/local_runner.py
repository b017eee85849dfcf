"""A training step without pipeline parallelism: gradient accumulation over the micro-batches, the
whole model on this rank (its expert slices, under expert parallelism). The same interface as
`pipeline_runner.PipelineRunner`, so the plan runs either without the trainer knowing which.

With expert parallelism and the overlap on (`overlap.Communicator`), the accumulation runs as F&B
pairs, as Megatron's combined 1F1B does without a pipeline: the forward of micro-batch j+1 with the
backward of micro-batch j, their all-to-alls hidden behind each other's computation. Gradients still
accumulate in micro-batch order and every forward sees the same weights, so the numbers are those of
the plain loop, bit for bit; the price is a second micro-batch's activations alive during a pair.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from types import SimpleNamespace
from typing import Callable, Optional, Protocol

import torch

from dsv3.model import Transformer
from dsv3.model.step_aux import StepAux, add_loads
from dsv3.parallel.overlap import Communicator
from dsv3.train.heldout import heldout_names, heldout_sums

# (tokens [b, S], labels [b, S], the tokens' document numbers [b, S] with data.document_masks, else None)
MicroBatch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class GradientSync(Protocol):
    """The data-parallel dimension's part in the accumulation: told before and after each micro-batch's
    backward whether it is the step's last, so that gradient buckets are reduced while the backward runs."""

    def before_backward(self, last: bool) -> None: ...

    def after_backward(self, last: bool) -> None: ...


class LocalRunner:
    def __init__(self, model: Transformer, device: torch.device, comm: Optional[Communicator] = None,
                 sync: Optional[GradientSync] = None):
        self.model, self.device, self.comm, self.sync = model, device, comm, sync

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.sync is not None:
            self.sync.before_backward(last)
        loss.backward()
        if self.sync is not None:
            self.sync.after_backward(last)

    def train_step(self, micro_batch: Callable[[int], MicroBatch], n_micro: int, mtp_weight: float,
                   aux: StepAux, autocast: AbstractContextManager) -> tuple[torch.Tensor, dict]:
        """Forward and backward of micro-batches 0..n_micro-1, each loss scaled by 1/n_micro (gradients
        accumulate in `.grad`; each forward gets `aux.fresh()`: the step's balance-loss coefficient and
        loss normalizer). Returns this rank's [main CE, MTP CE, balance loss] means and the step's expert
        counts per MoE layer."""
        model = self.model
        model.train()
        loads: dict = {}

        def forward(j: int) -> tuple[torch.Tensor, torch.Tensor]:
            tokens, labels, documents = micro_batch(j)
            mine = aux.fresh()  # this forward's own: the overlap runs two forwards at once
            with autocast:
                parts = model.losses(tokens, labels, documents, mine)
            mtp = torch.stack(parts.mtp).mean() if parts.mtp else torch.zeros((), device=tokens.device)
            add_loads(loads, mine.loads)
            logged = torch.stack([parts.main.detach().float(), mtp.detach().float(),
                                  mine.balance_sum(self.device)]) / n_micro
            return (parts.main + mtp_weight * mtp) / n_micro * mine.grad_scale, logged

        sums = torch.zeros(3, device=self.device)
        if self.comm is None or not self.comm.overlap:
            for j in range(n_micro):
                loss, logged = forward(j)
                self._backward(loss, last=j == n_micro - 1)
                sums += logged
            return sums, loads
        loss, logged = forward(0)
        for j in range(1, n_micro):
            ahead: dict = {}
            self.comm.run_pair(SimpleNamespace(run=lambda: ahead.update(out=forward(j))),  # noqa: B023
                               SimpleNamespace(run=lambda: self._backward(loss, last=False)))  # noqa: B023
            sums += logged
            loss, logged = ahead["out"]
        self._backward(loss, last=True)
        return sums + logged, loads

    @property
    def eval_names(self) -> list[str]:
        return heldout_names(len(self.model.mtp))

    @torch.no_grad()
    def eval_sums(self, tokens: torch.Tensor, labels: torch.Tensor, documents: Optional[torch.Tensor],
                  autocast: AbstractContextManager) -> Optional[dict[str, torch.Tensor]]:
        """Held-out figures of one batch, summed over its predictions: the main loss, accuracy and the MTP
        modules' (dsv3/train/heldout.py)."""
        self.model.eval()
        return heldout_sums(self.model, tokens, labels, documents, autocast)
