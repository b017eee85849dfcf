"""Parameter counts of the model, by the top-level units pipeline stages are made of, read from the
model itself built on the meta device (shapes only, no memory): what the planner counts is what the
trainer builds, for any size, the 671B model included.

A unit is what `dsv3.parallel.model_stages.StageLayout` places on stages: "embed", "layers.<i>",
"norm", "head", "mtp". Routed-expert weights (`Experts.w13`, `w2`) are counted apart: expert
parallelism splits them, and only K of E of them compute per token.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer
from dsv3.model.moe import Experts


@dataclass(frozen=True)
class UnitParams:
    dense: int = 0     # parameters every rank holding the unit holds whole
    expert: int = 0    # routed-expert parameters (split over the EP group)
    tensors: int = 0   # parameter tensors (optimizer state keeps a step counter per tensor)

    def __add__(self, o: "UnitParams") -> "UnitParams":
        return UnitParams(self.dense + o.dense, self.expert + o.expert, self.tensors + o.tensors)

    @property
    def total(self) -> int:
        return self.dense + self.expert


@dataclass(frozen=True)
class ModelShape:
    units: dict[str, UnitParams]
    fp8_linears: dict[str, tuple[int, int]]   # FP8-capable nn.Linear (out, in) by qualified name
    n_moe_layers: int                         # main model
    n_mtp_moe_layers: int
    largest_dense: int                        # elements of the largest parameter tensor not split by EP
    largest_expert: int                       # ... of the largest routed-expert tensor (before the EP split)

    def main_params(self) -> int:
        return sum(u.total for n, u in self.units.items() if n != "mtp")

    def mtp_params(self) -> int:
        return self.units["mtp"].total if "mtp" in self.units else 0


def unit_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def _key(cfg: ModelConfig) -> tuple:
    return tuple(sorted(dataclasses.asdict(cfg).items()))


def model_shape(cfg: ModelConfig) -> ModelShape:
    return _model_shape(_key(cfg))


@lru_cache(maxsize=16)
def _model_shape(key: tuple) -> ModelShape:
    cfg = ModelConfig(**dict(key))
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg, max_seq_len=min(cfg.max_seq_len, 8)))  # RoPE tables: no params
    expert_params = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    units: dict[str, UnitParams] = {}
    for name, p in model.named_parameters():
        u = unit_of(name)
        add = (UnitParams(expert=p.numel(), tensors=1) if id(p) in expert_params
               else UnitParams(dense=p.numel(), tensors=1))
        units[u] = units.get(u, UnitParams()) + add
    from dsv3.fp8.convert import fp8_units

    linears = {}
    for qual, kind in fp8_units(model).items():
        if kind == "linear":
            w = model.get_submodule(qual).weight
            linears[qual] = (w.shape[0], w.shape[1])
    n_moe = cfg.n_layers - cfg.n_dense_layers
    largest_dense = max((p.numel() for p in model.parameters() if id(p) not in expert_params), default=0)
    largest_expert = max((p.numel() for p in model.parameters() if id(p) in expert_params), default=0)
    return ModelShape(units, linears, n_moe, cfg.mtp_depth, largest_dense, largest_expert)


def activated_params(cfg: ModelConfig, shape: ModelShape, mtp: bool = False) -> int:
    """Parameters one token computes with: everything but the routed experts it is not sent to (the
    embedding counts: V3's 37B does). mtp: the MTP modules' (they share embedding and head)."""
    routed_per_layer = 3 * cfg.dim * cfg.moe_inter_dim * cfg.n_routed_experts
    if mtp:
        total, layers = shape.mtp_params(), shape.n_mtp_moe_layers
    else:
        total, layers = shape.main_params(), shape.n_moe_layers
    return total - layers * routed_per_layer * (cfg.n_routed_experts - cfg.n_activated_experts) // cfg.n_routed_experts
