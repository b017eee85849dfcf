"""Dynamic loss scaling for `precision.dtype=fp16` (GPUs without BF16: Turing, RTX 20xx).

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. The loss is multiplied by a scale S
before backward, so gradients are computed S times larger, and divided by S again before clipping and
the optimizer step. S is found at run time (Micikevicius et al. 2018, "Mixed Precision Training"):
when the gradients overflow (a non-finite gradient norm, agreed by every rank because the norm is
all-reduced), the step is skipped and S is halved; after `growth_interval` finite steps in a row S is
doubled, to use the range again. S is part of the run's state: it is saved in checkpoints and
reported in the metrics.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from dsv3.config.schema import PrecisionConfig


@dataclass
class DynamicLossScaler:
    scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    min_scale: float = 1.0
    good_steps: int = 0       # finite steps since the last change of the scale
    skipped_steps: int = 0    # overflows over the whole run

    def update(self, finite: bool) -> bool:
        """Record one step's outcome; True if the step is to be applied."""
        if not finite:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped_steps += 1
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
        return True

    def record(self, finite: bool, losses_finite: bool) -> bool:
        """One training step's outcome (`finite`: losses and gradient norm, agreed by every rank); True
        when it is an overflow: finite losses, non-finite gradients, the scale above its floor, so the
        scale's to fix and not divergence. A non-finite loss is not the scale's doing (the scale
        multiplies the loss after the forward): it leaves the scaler alone, for `train.on_nonfinite`."""
        if not losses_finite:
            return False
        overflow = not finite and not self.at_floor
        self.update(finite)
        return overflow

    @property
    def at_floor(self) -> bool:
        """The scale cannot shrink further: overflows now are not the scale's fault (divergence)."""
        return self.scale <= self.min_scale

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Tensors, so that checkpoints load with weights_only=True.
        return {"scale": torch.tensor(self.scale, dtype=torch.float64),
                "good_steps": torch.tensor(self.good_steps), "skipped_steps": torch.tensor(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def loss_scaler(cfg: PrecisionConfig) -> Optional[DynamicLossScaler]:
    """fp16's dynamic loss scaler (`precision.loss_scale`); None for the formats that need none."""
    if cfg.dtype != "fp16":
        return None
    s = cfg.loss_scale
    return DynamicLossScaler(scale=float(s.init), growth_interval=s.growth_interval, min_scale=float(s.min))
