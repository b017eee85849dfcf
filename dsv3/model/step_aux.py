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
    `parts`: set by a caller that runs each sequence in parts (Seq1F1B's segments), so that the
    balance loss takes its statistics over the whole sequences (None: each forward holds whole ones).
    Out: `loads`, tokens routed to each expert per MoE layer (for the aux-loss-free bias update);
    `balance`, the balance losses computed, in forward order (detached, for the log; with `parts`,
    what a part's forward knew: `SequenceParts.balance` has the whole sequences').

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
    parts: Optional[SequenceParts] = None
    loads: dict[MoE, torch.Tensor] = field(default_factory=dict)
    balance: list[torch.Tensor] = field(default_factory=list)
    forced_experts: Optional[dict[MoE, torch.Tensor]] = None
    record_experts: bool = False
    experts: dict[MoE, torch.Tensor] = field(default_factory=dict)
    routing_drift: dict[MoE, torch.Tensor] = field(default_factory=dict)

    def fresh(self) -> StepAux:
        """The same inputs, nothing recorded yet: one per forward of a step (forced routing, which is
        per forward, is not carried)."""
        return StepAux(self.balance_coeff, self.loss_normalizer, self.grad_scale, self.parts,
                       record_experts=self.record_experts)

    def balance_sum(self, device: torch.device) -> torch.Tensor:
        if not self.balance:
            return torch.zeros((), device=device)
        return torch.stack([b.to(device, torch.float32) for b in self.balance]).sum()


def add_loads(total: dict[MoE, torch.Tensor], more: dict[MoE, torch.Tensor]) -> None:
    """Accumulate one forward's expert counts into a step's."""
    for moe, counts in more.items():
        total[moe] = total[moe] + counts if moe in total else counts


class SequenceParts:
    """The MoE layers' routing statistics of sequences whose forward runs in parts (Seq1F1B's
    segments), for the sequence-wise balance loss alpha * sum_i f_i P_i: f_i (expert i's share of the
    sequence's K choices, no gradient) is over the whole sequence, which no part sees alone. Every part
    of a sequence runs its forward before any part's backward, so the backward reads complete totals.

    The caller names the part running (`at`: sequence, part), for the forward and again for the
    backward, where activation checkpointing may recompute the part's forward: a part's statistics
    are stored under its name, so a recomputation replaces them with the same values."""

    def __init__(self):
        self.at: Optional[tuple[int, int]] = None
        self._parts: dict[tuple[MoE, int], dict[int, tuple[torch.Tensor, int, torch.Tensor]]] = {}

    def add(self, moe: MoE, hits: torch.Tensor, positions: int, prob_sums: torch.Tensor):
        """This part's hits [B, E] and summed routing probabilities [B, E] over its `positions`; returns
        a function giving the sequences' totals so far (hits, positions): complete once all parts ran."""
        if self.at is None:
            raise RuntimeError("SequenceParts: a MoE forward ran outside a named part (set `at`)")
        sequence, part = self.at
        parts = self._parts.setdefault((moe, sequence), {})
        parts[part] = (hits.detach(), positions, prob_sums.detach())

        def totals() -> tuple[torch.Tensor, int]:
            return sum(h for h, _, _ in parts.values()), sum(n for _, n, _ in parts.values())
        return totals

    def balance(self, device: torch.device) -> torch.Tensor:
        """The whole sequences' balance losses, summed over the MoE layers and sequences (each a mean
        over the batch's sequences, as a whole forward's is)."""
        from dsv3.model.moe import balance_from_totals

        total = torch.zeros((), device=device)
        for (moe, _), parts in self._parts.items():
            hits = sum(h for h, _, _ in parts.values())
            positions = sum(n for _, n, _ in parts.values())
            prob_sums = sum(p for _, _, p in parts.values())
            total = total + balance_from_totals(prob_sums, hits, positions, moe.n_activated).to(device, torch.float32)
        return total
