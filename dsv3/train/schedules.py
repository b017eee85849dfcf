"""Step-indexed schedules of the V3 recipe: learning rate, batch size, MTP weight lambda and bias speed gamma.

All are pure functions of the step (or of the samples consumed), so a resumed run continues them exactly.
"""
import math

from dsv3.config.schema import OptimConfig, TrainConfig


def learning_rate(step: int, o: OptimConfig) -> float:
    """Linear warmup to `lr`, constant, cosine to `min_lr`, then the constant tail phases (V3 report, 4.2)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    step -= o.warmup_steps
    if step < o.constant_steps or o.decay_steps == 0:
        return o.lr
    step -= o.constant_steps
    if step < o.decay_steps:
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * step / o.decay_steps))
    step -= o.decay_steps
    lr = o.min_lr
    for steps, tail_lr in o.tail:
        lr = tail_lr
        if step < steps:
            break
        step -= steps
    return lr


def global_batch_size(consumed_samples: int, t: TrainConfig, unit: int) -> int:
    """The V3 batch-size ramp: linear in samples consumed from `batch_ramp_start` to `global_batch_size`,
    rounded down to a multiple of `unit` (micro-batch times data-parallel ranks)."""
    if not t.batch_ramp_start or consumed_samples >= t.batch_ramp_samples:
        return t.global_batch_size
    size = t.batch_ramp_start + (t.global_batch_size - t.batch_ramp_start) * consumed_samples / t.batch_ramp_samples
    return max(unit, int(size) // unit * unit)


def mtp_weight(step: int, t: TrainConfig) -> float:
    switch = t.mtp_loss_weight_switch_step
    return t.mtp_loss_weight_late if 0 <= switch <= step else t.mtp_loss_weight


def bias_update_speed(step: int, t: TrainConfig) -> float:
    stop = t.bias_update_stop_step
    return 0.0 if 0 <= stop <= step else t.bias_update_speed
