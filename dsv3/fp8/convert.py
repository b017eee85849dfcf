"""Apply the FP8 recipe to a built model from outside it, as a parallel plan is applied.

Swapped (same Parameter objects, so names, shapes, state dicts, checkpoints and the HF export are
unchanged):
- every nn.Linear except the output head -> `Fp8Linear` (MLA's wq / wq_a / wq_b / wkv_a / wkv_b / wo,
  the MTP projections); `wo` takes the `attn_out` role;
- every SwiGLU `FeedForward` (dense FFNs, shared experts) -> `Fp8FeedForward`;
- every routed `Experts` -> `Fp8Experts`.
Untouched, in high precision as in the report: the embedding, the output head, the MoE gates (fp32),
the norms and the attention core (SDPA); plus whatever `precision.fp8.high_precision` names.
"""
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.config.schema import Fp8Config
from dsv3.fp8.linear import Fp8Linear
from dsv3.fp8.recipe import Fp8Recipe, backend_for, describe
from dsv3.fp8.swiglu import Fp8Experts, Fp8FeedForward
from dsv3.model.mla import MLA
from dsv3.model.moe import Experts, FeedForward

ALWAYS_HIGH_PRECISION = ("head",)  # the output head (shared by the MTP modules); embedding/gates/norms are no Linear


@dataclass
class Fp8Summary:
    """What `convert_to_fp8` did, for the log and for tests."""

    path: str
    linears: list[str] = field(default_factory=list)
    ffns: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"FP8 recipe: {self.path}; in FP8: {len(self.linears)} linears, {len(self.ffns)} SwiGLU FFNs, "
                f"{len(self.experts)} routed-expert groups; kept in high precision: embedding, head, gates, norms, "
                f"attention core" + (f", {', '.join(self.kept)}" if self.kept else ""))


def fp8_units(model: nn.Module) -> dict[str, str]:
    """Qualified name -> kind ("linear", "ffn", "experts") of every module the recipe would put in FP8."""
    units: dict[str, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qual = prefix + name
            if isinstance(child, Experts):
                units[qual] = "experts"
            elif isinstance(child, FeedForward):
                units[qual] = "ffn"  # its w1/w2/w3 go in FP8 together, through the fused SwiGLU
            elif type(child) is nn.Linear and qual not in ALWAYS_HIGH_PRECISION:
                units[qual] = "linear"
            else:
                walk(child, qual + ".")

    walk(model, "")
    return units


def unmatched_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    names = list(fp8_units(model))
    return [p for p in patterns if not fnmatch.filter(names, p)]


def make_recipe(cfg: Fp8Config, impl: str) -> Fp8Recipe:
    return Fp8Recipe(backend=backend_for(impl), pow2_roles=frozenset(cfg.pow2_scales), amax_floor=cfg.amax_floor)


def convert_to_fp8(model: nn.Module, cfg: Fp8Config, impl: str, device: torch.device | str = "cpu") -> Fp8Summary:
    """Swap the model's linears, FFNs and routed experts for their FP8 versions, in place.

    impl: the resolved FP8 GEMM implementation, "reference" (emulation) or "triton"
    (`dsv3.kernels.ops.resolve_grouped_gemm_impl(..., fp8=True)`)."""
    if any(isinstance(m, (Fp8Linear, Fp8FeedForward, Fp8Experts)) for m in model.modules()):
        raise ValueError("convert_to_fp8: the model already has FP8 modules (convert it once)")
    recipe = make_recipe(cfg, impl)
    assert not unmatched_patterns(model, cfg.high_precision), cfg.high_precision  # validated: config_rules.py
    summary = Fp8Summary(describe(recipe, torch.device(device)))
    for qual, kind in fp8_units(model).items():
        if any(fnmatch.fnmatch(qual, p) for p in cfg.high_precision):
            summary.kept.append(qual)
            continue
        parent_name, _, name = qual.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        if kind == "experts":
            setattr(parent, name, Fp8Experts(child, recipe))
            summary.experts.append(qual)
        elif kind == "ffn":
            setattr(parent, name, Fp8FeedForward(child, recipe))
            summary.ffns.append(qual)
        else:
            role = "attn_out" if isinstance(parent, MLA) and name == "wo" else "linear_in"
            setattr(parent, name, Fp8Linear(child, recipe, role))
            summary.linears.append(qual)
    return summary
