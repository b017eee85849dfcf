"""Config rules of the `hardware.*` keys (what the planner plans for; training does not read them),
registered in dsv3/config/rules.py."""
import re

from dsv3.config.rules import World, require
from dsv3.config.schema import Config


def hardware_rules(cfg: Config, world: World) -> None:
    h = cfg.hardware
    if not h.name:
        return
    for key in ("nodes", "gpus_per_node"):
        require(getattr(h, key) >= 1, f"hardware.{key}", getattr(h, key), "must be >= 1")
    require(h.memory_gib > 0, "hardware.memory_gib", h.memory_gib, "must be > 0 (GiB of one GPU)")
    require(0 <= h.reserved_gib < h.memory_gib, "hardware.reserved_gib", h.reserved_gib,
            f"must be >= 0 and below hardware.memory_gib ({h.memory_gib})")
    require(h.bf16_tflops > 0, "hardware.bf16_tflops", h.bf16_tflops, "must be > 0 (dense BF16 peak, TFLOP/s)")
    for key in ("fp8_tflops", "intra_node_gbs", "inter_node_gbs", "host_memory_gib"):
        require(getattr(h, key) >= 0, f"hardware.{key}", getattr(h, key), "must be >= 0 (0 = none or unknown)")
    require(0 < h.mfu <= 1, "hardware.mfu", h.mfu, "must be in (0, 1]")
    require(h.compute_capability == "" or re.fullmatch(r"\d+\.\d+", h.compute_capability) is not None,
            "hardware.compute_capability", h.compute_capability, 'must look like "8.9" (or "" for none)')


RULES = (hardware_rules,)
