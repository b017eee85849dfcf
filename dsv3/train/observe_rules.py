"""Config rules of what a run shows of itself: the profiler window, torch.compile, W&B, the MFU peak."""
from typing import Any

from dsv3.config.errors import ConfigError

WANDB_MODES = ("online", "offline")


def validate_observability(cfg: Any) -> None:
    t, lg = cfg.train, cfg.logging
    steps = list(t.profile_steps)
    if steps:
        if not (len(steps) == 2 and 1 <= steps[0] <= steps[1]):
            raise ConfigError("train.profile_steps", steps, "must be [] (off) or [a, b] with 1 <= a <= b (steps "
                              "are counted from 1, as in the progress line)")
        if steps[0] > t.max_steps:
            raise ConfigError("train.profile_steps", steps, f"must start at or before train.max_steps ({t.max_steps})")
    if t.compile and cfg.precision.dtype == "fp8":
        raise ConfigError("train.compile", t.compile, "is not supported with precision=fp8 yet (the FP8 modules "
                          "are not compiled); use precision=bf16 or fp32 with train.compile=true")
    if lg.wandb:
        from dsv3.train.wandb_sink import wandb_available

        if not wandb_available():
            raise ConfigError("logging.wandb", lg.wandb, "needs the wandb package, which is not installed: "
                              "pip install wandb (or set logging.wandb=false)")
    if lg.wandb_mode not in WANDB_MODES:
        raise ConfigError("logging.wandb_mode", lg.wandb_mode, f"must be one of {', '.join(WANDB_MODES)}")
    if lg.peak_tflops < 0:
        raise ConfigError("logging.peak_tflops", lg.peak_tflops, "must be >= 0 (0 = datasheet or measured)")
