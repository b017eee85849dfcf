"""A training step without pipeline parallelism: gradient accumulation over the micro-batches, the
whole model on this rank (its expert slices, under expert parallelism). The same interface as
`pipeline_runner.PipelineRunner`, so the plan runs either without the trainer knowing which."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Optional

import torch

from dsv3.model import Transformer

MicroBatch = tuple[torch.Tensor, torch.Tensor]   # (tokens [b, S], labels [b, S])


class LocalRunner:
    def __init__(self, model: Transformer, device: torch.device):
        self.model, self.device = model, device

    def train_step(self, micro_batch: Callable[[int], MicroBatch], n_micro: int, mtp_weight: float,
                   autocast: AbstractContextManager) -> torch.Tensor:
        """Forward and backward of micro-batches 0..n_micro-1, each loss scaled by 1/n_micro (gradients
        accumulate in `.grad`). Returns this rank's [main CE, MTP CE, balance loss] means."""
        model = self.model
        model.train()
        moes = model.moe_layers()
        sums = torch.zeros(3, device=self.device)
        for j in range(n_micro):
            tokens, labels = micro_batch(j)
            with autocast:
                parts = model.losses(tokens, labels)
            mtp = torch.stack(parts.mtp).mean() if parts.mtp else torch.zeros((), device=tokens.device)
            ((parts.main + mtp_weight * mtp) / n_micro).backward()
            balance = sum((m.last_balance_loss.to(sums.device) for m in moes), torch.zeros_like(sums[0]))
            sums += torch.stack([parts.main.detach().float(), mtp.detach().float(), balance]) / n_micro
        return sums

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, labels: torch.Tensor,
                  autocast: AbstractContextManager) -> Optional[torch.Tensor]:
        """Main next-token CE of one batch (the held-out loss)."""
        self.model.eval()
        with autocast:
            return self.model.main_loss(self.model.hidden(tokens), labels)
