"""DeepSeek-V3's fine-grained FP8 training recipe (report §3.3), applied to a built model from outside.

    summary = convert_to_fp8(model, cfg.precision.fp8, impl)   # impl: "reference" (CPU emulation) | "triton"

`convert.py` swaps modules, `linear.py` / `swiglu.py` hold the FP8 autograd functions, `recipe.py` the
shared choices, `config_rules.py` the config rules, `memory.py` the accounting of what backward keeps.
"""
from dsv3.fp8.convert import Fp8Summary, convert_to_fp8, fp8_units
from dsv3.fp8.linear import Fp8Linear, Fp8LinearFunction
from dsv3.fp8.recipe import ROLES, Fp8Recipe
from dsv3.fp8.swiglu import Fp8Experts, Fp8FeedForward, Fp8SwiGLUFunction

__all__ = ["convert_to_fp8", "fp8_units", "Fp8Summary", "Fp8Linear", "Fp8LinearFunction", "Fp8Recipe", "ROLES",
           "Fp8Experts", "Fp8FeedForward", "Fp8SwiGLUFunction"]
