"""Divergence: a step whose loss or gradient norm is not finite is not applied (`train.on_nonfinite`).

Every rank decides on the same evidence: the step's loss sums and a flag for this rank's gradient
norm travel in the one all-reduce that already averages the losses for the log, and a NaN on any rank
reaches all of them through it. With `skip` the optimizer and the router biases are left as they
were and the next batch is tried; after `train.max_consecutive_skips` skipped steps in a row (or at
the first one with `stop`) the run stops with exit code 3 (`dsv3.exit_codes`) and saves nothing.
A model is never saved with a non-finite parameter, whatever the policy.
"""
from typing import Callable

import torch
from torch import nn

from dsv3.parallel.mesh import all_reduce_sum


def agree_on_step(sums: torch.Tensor, grad_norm: torch.Tensor,
                  reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum) -> tuple[torch.Tensor, bool]:
    """(`reduce(sums)`, whether every rank's losses and gradient norm are finite). `reduce` is the
    collective that turns this rank's loss sums into the global ones (the plan's `global_loss_parts`:
    a sum over the world, scaled); a flag for this rank's gradient norm rides along in it, and a NaN
    on any rank reaches every rank through the sum. A collective: every rank calls it once per step."""
    flag = (~torch.isfinite(grad_norm.float())).float().reshape(1).to(sums.device)
    packed = reduce(torch.cat([sums.float(), flag]))
    return packed[:-1], bool(torch.isfinite(packed[:-1]).all()) and packed[-1].item() == 0


@torch.no_grad()
def model_is_finite(model: nn.Module, device: torch.device) -> bool:
    """Whether every rank's parameters and buffers are all finite. A collective."""
    finite = [torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    # one host sync for the whole model, not one per tensor
    bad = (~torch.stack(finite)).sum().float().reshape(1).to(device) if finite else torch.zeros(1, device=device)
    return all_reduce_sum(bad).item() == 0


class NonFiniteSteps:
    """Counts skipped steps and says when to stop. policy: "skip" (up to `max_consecutive` in a row) or "stop"."""

    def __init__(self, policy: str, max_consecutive: int):
        assert policy in ("skip", "stop"), policy  # validated config
        self.limit = 1 if policy == "stop" else max_consecutive
        self.consecutive = 0
        self.total = 0

    def record(self, finite: bool) -> None:
        self.consecutive = 0 if finite else self.consecutive + 1
        self.total += not finite

    @property
    def must_stop(self) -> bool:
        return self.consecutive >= self.limit
