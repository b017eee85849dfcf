"""Aux-loss-free load balancing (DeepSeek-V3 report, 2.1.2): after each optimizer step, every router's
bias b_i moves by gamma towards balance, judged on the whole global batch's expert counts."""
from typing import Callable, Optional

import torch

from dsv3.model.moe import MoE


@torch.no_grad()
def update_router_biases(moe_layers: list[MoE], loads: dict[MoE, torch.Tensor], speed: float,
                         all_reduce: Optional[Callable[[torch.Tensor], None]] = None,
                         all_layers: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Apply b_i += gamma * sign(mean load - load_i) to every router, with `loads` the step's expert
    counts of each layer (`StepAux.loads` of the step's forwards; a layer that saw no token counts
    zeros) summed over ranks by `all_reduce`, and return load-balance figures of this step, and the
    counts [layers, experts] under "expert_load" (where this rank has MoE layers).

    MaxVio = (max_i load_i - mean load) / mean load, per layer (Wang et al., 2024, the metric V3 reports),
    reported over the model's every MoE layer: `all_layers` maps this rank's per-layer values to those of
    all layers when a rank holds only some (pipeline stages)."""
    max_vio, counts = torch.zeros(0), None
    if moe_layers:
        counts = torch.stack([loads[m].float() if m in loads else torch.zeros_like(m.gate.bias)
                              for m in moe_layers])  # [layers, experts]
        if all_reduce is not None:
            all_reduce(counts)
        mean = counts.mean(dim=1, keepdim=True)
        for moe, load, m in zip(moe_layers, counts, mean):
            moe.gate.bias += speed * torch.sign(m - load)
        max_vio = ((counts.max(dim=1).values - mean.squeeze(1)) / mean.squeeze(1).clamp_min(1e-9)).float()
    if all_layers is not None:  # collective: also on a rank without MoE layers
        max_vio = all_layers(max_vio)
    if max_vio.numel() == 0:
        return {}
    figures = {"max_vio": max_vio.mean().item(), "max_vio_worst_layer": max_vio.max().item()}
    # this rank's layers' counts (summed over ranks), for the per-expert load log (routing_stats.py)
    return figures if counts is None else {**figures, "expert_load": counts}
