"""What a training forward needs and reports beyond its tokens and hidden states.

The caller (the plan's runner, a pipeline stage) makes one `StepAux` per forward, hands it to
`Transformer.losses` (and down to every MoE layer and loss), and reads it back; nothing is kept on
the modules between forwards, and an evaluation forward (no aux) records nothing and takes the plain
mean loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from dsv3.model.moe import MoE


@dataclass
class StepAux:
    """In: `balance_coeff`, alpha times this forward's share of the step's loss (0 = no sequence-wise
    balance loss); `loss_normalizer`, the divisor of each cross-entropy's sum over the labels that
    count (None: their mean), set when micro-batches count different numbers of labels (SFT);
    `grad_scale`, the factor every gradient of the step carries (fp16's loss scale, 1 otherwise): the
    runner multiplies the loss it backpropagates by it, the MoE layers the balance loss's gradient.
    Out: `loads`, tokens routed to each expert per MoE layer (for the aux-loss-free bias update);
    `balance`, the balance losses computed, in forward order (detached, for the log).

    Routing, for forwards that must route as an earlier one did (RL's router replay): in,
    `forced_experts`, per MoE layer the experts [B, S, K] each token must use instead of the router's
    own top-k (a token whose row is negative keeps the router's choice; the gating weights are still the
    router's scores of the experts used, so the router gets its gradient); `record_experts`, keep the
    experts each layer used. Out: `experts`, per MoE layer the experts used [B, S, K] (with
    record_experts); `routing_drift`, per forced layer [B, S] bool, where the router's own choice is
    another set of experts than the forced one."""

    balance_coeff: float = 0.0
    loss_normalizer: Optional[float] = None
    grad_scale: float = 1.0
    loads: dict[MoE, torch.Tensor] = field(default_factory=dict)
    balance: list[torch.Tensor] = field(default_factory=list)
    forced_experts: Optional[dict[MoE, torch.Tensor]] = None
    record_experts: bool = False
    experts: dict[MoE, torch.Tensor] = field(default_factory=dict)
    routing_drift: dict[MoE, torch.Tensor] = field(default_factory=dict)

    def fresh(self) -> StepAux:
        """The same inputs, nothing recorded yet: one per forward of a step (forced routing, which is
        per forward, is not carried)."""
        return StepAux(self.balance_coeff, self.loss_normalizer, self.grad_scale, record_experts=self.record_experts)

    def balance_sum(self, device: torch.device) -> torch.Tensor:
        if not self.balance:
            return torch.zeros((), device=device)
        return torch.stack([b.to(device, torch.float32) for b in self.balance]).sum()


def add_loads(total: dict[MoE, torch.Tensor], more: dict[MoE, torch.Tensor]) -> None:
    """Accumulate one forward's expert counts into a step's."""
    for moe, counts in more.items():
        total[moe] = total[moe] + counts if moe in total else counts
