"""Config rules of the FP8 recipe (`precision.fp8.*`, and the device `precision.dtype=fp8` needs),
registered in dsv3/config/rules.py."""
import math

from dsv3.config.errors import ConfigError
from dsv3.config.precision import device_type
from dsv3.config.rules import World
from dsv3.config.schema import Config
from dsv3.fp8.recipe import ROLES
from dsv3.kernels.fp8_format import DEFAULT_AMAX_FLOOR, FP8_MIN_CAPABILITY


def fp8_rules(cfg: Config, world: World) -> None:
    """precision.dtype=fp8: a device that can run it (CPU emulates; CUDA needs 8.9+) and valid options."""
    if cfg.precision.dtype != "fp8":
        return
    if device_type(cfg.train.device) == "cuda":
        import torch

        cap = torch.cuda.get_device_capability()
        if cap < FP8_MIN_CAPABILITY:
            raise ConfigError("precision.dtype", "fp8",
                              f"needs FP8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper); "
                              f"{torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}: use precision.dtype=bf16 (8.0+) or fp16")
    f, key = cfg.precision.fp8, "precision.fp8"
    unknown = [r for r in f.pow2_scales if r not in ROLES]
    if unknown:
        raise ConfigError(f"{key}.pow2_scales", list(f.pow2_scales), f"{unknown} unknown; allowed: {', '.join(ROLES)}")
    if not (f.amax_floor > 0 and math.isfinite(f.amax_floor)):
        raise ConfigError(f"{key}.amax_floor", f.amax_floor, "must be a finite number > 0")
    if cfg.parallel.ep > 1:
        # The FP8 dispatch kernel quantizes the expert input with power-of-two scales and the default floor;
        # the experts use those rows as they are, so the recipe must quantize that tensor the same way.
        if "expert_in" not in f.pow2_scales:
            raise ConfigError(f"{key}.pow2_scales", list(f.pow2_scales),
                              "must contain expert_in with parallel.ep > 1 (FP8 dispatch sends power-of-two scales)")
        if f.amax_floor != DEFAULT_AMAX_FLOOR:
            raise ConfigError(f"{key}.amax_floor", f.amax_floor,
                              f"must be {DEFAULT_AMAX_FLOOR:g} with parallel.ep > 1 (the FP8 dispatch kernel's floor)")
    if f.high_precision:
        import torch

        from dsv3.fp8.convert import unmatched_patterns
        from dsv3.model import Transformer

        with torch.device("meta"):  # names only: no memory, no initialization
            model = Transformer(cfg.model)
        missing = unmatched_patterns(model, list(f.high_precision))
        if missing:
            raise ConfigError(f"{key}.high_precision", list(f.high_precision),
                              f"{missing} match no FP8 linear, SwiGLU FFN or routed experts (module names such as "
                              "layers.0.attn.wq_a, layers.0.ffn, layers.1.ffn.shared_experts, layers.1.ffn.experts)")


RULES = (fp8_rules,)
