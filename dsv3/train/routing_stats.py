"""Expert-load statistics beyond the per-step MaxVio of `balance.py`:

- `expert_load.jsonl` in the run directory: every MoE layer's share of routed tokens per expert, summed
  over each logging interval (what `launch/plot.py` draws as a layer x expert heatmap over steps);
- MaxVio on the held-out slice (MaxVio_global of Wang et al., 2024, arXiv 2408.15664: the imbalance of
  the load accumulated over a whole evaluation set, where MaxVio_batch is that of one training batch).

MaxVio = (max_i load_i - mean load) / mean load, per layer; the figures average it over the layers.
"""
import json
import os
from typing import Callable, Optional

import torch

from dsv3.model.moe import MoE

AllLayers = Callable[[torch.Tensor], torch.Tensor]


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """[layers, experts] token counts -> MaxVio per layer."""
    mean = loads.float().mean(dim=1)
    return (loads.float().max(dim=1).values - mean) / mean.clamp_min(1e-9)


def whole_model_loads(local: torch.Tensor, all_layers: Optional[AllLayers]) -> torch.Tensor:
    """This rank's [local layers, experts] counts -> [every MoE layer, experts]. `all_layers` maps one
    value per local layer to one per layer of the model (collective on pipeline ranks, identity
    otherwise), so it runs once per expert column: on every rank, also one without MoE layers."""
    if all_layers is None:
        return local
    return torch.stack([all_layers(local[:, e]) for e in range(local.shape[1])], dim=1)


class ExpertLoadLog:
    """Sums each step's expert counts (after the sum over ranks) and writes one record per logging
    interval: {"step", "steps", "load": [layer][expert] share of that layer's routed tokens}."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self._file = open(os.path.join(run_dir, "expert_load.jsonl"), "a", buffering=1) if enabled else None
        self._sum: Optional[torch.Tensor] = None
        self._steps = 0

    def add(self, loads: torch.Tensor) -> None:
        """One step's [local MoE layers, experts] counts, summed over the ranks that route through them."""
        self._sum = loads.detach().float().clone() if self._sum is None else self._sum + loads.float()
        self._steps += 1

    def write(self, step: int, n_experts: int, all_layers: Optional[AllLayers] = None) -> None:
        """Collective with pipeline stages (every rank calls it at the same steps); the main rank writes."""
        if self._steps == 0:
            return
        local = self._sum if self._sum is not None else torch.zeros(0, n_experts)
        loads = whole_model_loads(local, all_layers).cpu()
        self._sum, steps, self._steps = None, self._steps, 0
        if self._file is None or loads.numel() == 0:
            return
        shares = loads / loads.sum(dim=1, keepdim=True).clamp_min(1e-9)
        record = {"step": step, "steps": steps, "load": [[round(x, 6) for x in row] for row in shares.tolist()]}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RoutedTokenCounter:
    """Counts the experts every router selects while active (forward hooks on the gates: no change to the
    model, any plan). For held-out MaxVio: `with counter: <eval forwards>`, then `counter.max_vio(...)`.

    `reported[i]`: whether layer i enters the figures. The held-out MaxVio is the main model's (the MTP
    modules' layers are counted but left out): a pipeline's evaluation runs the main model only, and the
    figure must not depend on the plan."""

    def __init__(self, moe_layers: list[MoE], n_experts: int, device: torch.device,
                 reported: Optional[list[bool]] = None):
        self.moe_layers = moe_layers
        self.reported = torch.tensor([True] * len(moe_layers) if reported is None else reported,
                                     dtype=torch.bool, device=device)
        self.counts = torch.zeros(len(moe_layers), n_experts, device=device)
        self.counting = True  # off for filler forwards that only keep ranks in step
        self._hooks = []

    def __enter__(self) -> "RoutedTokenCounter":
        for i, moe in enumerate(self.moe_layers):
            self._hooks.append(moe.gate.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, layer: int):
        def count(module, inputs, output) -> None:
            if self.counting:
                indices = output[1]  # Gate.forward -> (weights, indices, scores)
                self.counts[layer] += torch.bincount(indices.flatten(), minlength=self.counts.shape[1])
        return count

    def max_vio(self, sum_over_ranks: Optional[Callable[[torch.Tensor], None]] = None,
                all_layers: Optional[AllLayers] = None) -> dict[str, float]:
        """MaxVio of the counted load of the reported layers: averaged over them, and the worst one.
        Collective like the training step's bias update."""
        counts = self.counts.clone()
        if sum_over_ranks is not None and counts.numel():
            sum_over_ranks(counts)
        per_layer = max_violation(counts) if counts.numel() else torch.zeros(0, device=counts.device)
        reported = self.reported.float()
        if all_layers is not None:
            per_layer, reported = all_layers(per_layer), all_layers(reported)
        if reported.sum() == 0:
            return {}
        per_layer = per_layer[reported > 0]
        return {"val_max_vio": per_layer.mean().item(), "val_max_vio_worst_layer": per_layer.max().item()}
