"""Config rules of the kernels (`kernels.*`), registered in dsv3/config/rules.py: the implementation
asked for exists and can run on this device (no silent fallback)."""
from dsv3.config.errors import ConfigError
from dsv3.config.precision import compute_dtype, device_type
from dsv3.config.rules import World, one_of
from dsv3.config.schema import Config
from dsv3.kernels.ops import GROUPED_GEMM_IMPLS, resolve_grouped_gemm_impl


def grouped_gemm_rules(cfg: Config, world: World) -> None:
    one_of("kernels.grouped_gemm", cfg.kernels.grouped_gemm, GROUPED_GEMM_IMPLS)
    device = device_type(cfg.train.device)
    try:
        resolve_grouped_gemm_impl(cfg.kernels.grouped_gemm, device, compute_dtype(cfg.precision.dtype, device),
                                  fp8=cfg.precision.dtype == "fp8")
    except ValueError as e:
        raise ConfigError("kernels.grouped_gemm", cfg.kernels.grouped_gemm, str(e)) from None


RULES = (grouped_gemm_rules,)
