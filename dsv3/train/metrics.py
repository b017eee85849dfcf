"""What a run reports: a progress line, `metrics.jsonl` (one object per logged step), TensorBoard events
and any further sinks (Weights & Biases). Only the main rank writes."""
import json
import logging
import math
import os
import time

log = logging.getLogger("dsv3")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, max_steps: int, tensorboard: bool = True, sinks=()):
        """`sinks`: objects with log(step, metrics) and close(), given every logged record."""
        self.enabled, self.max_steps = enabled, max_steps
        self._jsonl = self._tb = None
        self._sinks = list(sinks) if enabled else []
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events (metrics.jsonl is still written)")
        self._start = time.time()
        self._first_step = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        # NaN/inf as null: metrics.jsonl stays valid JSON for every reader (a diverged step has a NaN loss)
        record = {"step": step, **{k: None if isinstance(v, float) and not math.isfinite(v) else v
                                   for k, v in metrics.items()}, "time": round(time.time() - self._start, 3)}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        for sink in self._sinks:
            sink.log(step, metrics)
        if self._first_step is None:
            self._first_step, self._first_time = step, time.time()
        done = step - self._first_step
        eta = (time.time() - self._first_time) / done * (self.max_steps - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.max_steps}"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "val_loss" in metrics:
            parts.append(f"val {metrics['val_loss']:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        if "peak_mem_gib" in metrics:
            parts.append(f"mem {metrics['peak_mem_gib']:.2f} GiB")
        if "max_vio" in metrics:
            parts.append(f"maxvio {metrics['max_vio']:.2f}")
        if "a2a_s" in metrics:  # expert all-to-alls on rank 0: issue to completion, and what was not hidden
            parts.append(f"a2a {1e3 * metrics['a2a_s']:.0f} ms ({1e3 * metrics['a2a_exposed_s']:.0f} exposed)")
        if eta == eta:
            parts.append(f"eta {format_duration(eta)}")
        if metrics.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []
