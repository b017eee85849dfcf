"""Config rules of the kernels (`kernels.*`), registered in dsv3/config/rules.py: the implementation
asked for exists and can run on this device (no silent fallback)."""
from dsv3.config.errors import ConfigError
from dsv3.config.rules import World, one_of
from dsv3.config.schema import Config
from dsv3.kernels.ops import GROUPED_GEMM_IMPLS, resolve_grouped_gemm_impl


def grouped_gemm_rules(cfg: Config, world: World) -> None:
    import torch

    one_of("kernels.grouped_gemm", cfg.kernels.grouped_gemm, GROUPED_GEMM_IMPLS)
    # train.device=cuda without a visible GPU is reported by the train.device rule.
    use_cuda = cfg.train.device in ("cuda", "auto") and torch.cuda.is_available()
    dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32
    try:
        resolve_grouped_gemm_impl(cfg.kernels.grouped_gemm, "cuda" if use_cuda else "cpu", dtype,
                                  fp8=cfg.precision.dtype == "fp8")
    except ValueError as e:
        raise ConfigError("kernels.grouped_gemm", cfg.kernels.grouped_gemm, str(e)) from None


RULES = (grouped_gemm_rules,)
