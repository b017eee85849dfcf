"""How hard a run works its hardware: model FLOPs per token, model FLOPs utilization (MFU) and peak memory.

MFU = model FLOPs per token x tokens per second / (devices x peak FLOP/s). Model FLOPs are the planner's
(`dsv3.planner.flops.training_flops`): the useful work of a training step (forward + backward = 3x
forward matmuls; causal attention, values of their own width; MTP included), not what an
implementation spends on recomputation or padding. The peak is the datasheet's
dense BF16 tensor-core rate of a known GPU, `logging.peak_tflops` if given, and otherwise measured at
start-up: the best of a few square GEMMs in the run's compute dtype on this device (on a CPU, with the
run's threads), so that a CPU's MFU means "share of what its GEMMs reach here".
"""
import logging
import resource
import sys
import time
from typing import Optional

import torch

from dsv3.config.schema import HardwareConfig, ModelConfig
from dsv3.planner.flops import training_flops

log = logging.getLogger("dsv3")

# Dense BF16 tensor-core peaks (TFLOP/s, no sparsity, FP32 accumulation) from the vendors' datasheets,
# matched against torch.cuda.get_device_name in this order.
DATASHEET_TFLOPS = [("H200", 989.4), ("H100", 989.4), ("H800", 989.4), ("H20", 148.0), ("A100", 312.0),
                    ("A800", 312.0), ("L40S", 362.1), ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2)]


def measured_gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """Best rate of an n x n x n GEMM over repetitions for about `seconds` (at least 5, after a warm-up):
    the best, because on a shared machine most repetitions are slowed by other processes."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, begin, reps = float("inf"), time.perf_counter(), 0
    while reps < 6 or (time.perf_counter() - begin < seconds and reps < 200):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if reps:
            best = min(best, time.perf_counter() - start)
        reps += 1
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, configured: float = 0.0,
                hardware: Optional[HardwareConfig] = None) -> tuple[float, str]:
    """(TFLOP/s of one device, where the figure comes from): `logging.peak_tflops`, else the hardware
    preset's BF16 peak (the planner's reference too) when the run names one and computes on a GPU,
    else the datasheet of a known GPU, else measured."""
    if configured > 0:
        return configured, "logging.peak_tflops"
    if hardware is not None and hardware.bf16_tflops > 0 and device.type == "cuda":
        return hardware.bf16_tflops, f"hardware.bf16_tflops of {hardware.name or hardware.gpu}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DATASHEET_TFLOPS:
            if key in name:
                return tflops, f"datasheet dense BF16 of {name}"
        n = 8192
    else:
        n = 1024
    dtype_name = str(dtype).replace("torch.", "")
    return measured_gemm_tflops(device, dtype, n), f"measured {n}^3 {dtype_name} GEMM on {device.type}"


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process since it started: CUDA memory allocated by tensors on a GPU, the
    resident set (RSS) of the process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20), "host"


class Throughput:
    """The figures a progress line and metrics.jsonl carry per step: `mfu` and `peak_mem_gib`."""

    def __init__(self, cfg: ModelConfig, seq_len: int, world_size: int, device: torch.device,
                 compute_dtype: torch.dtype, configured_peak: float = 0.0,
                 hardware: Optional[HardwareConfig] = None):
        # the planner's count (checked against torch.utils.flop_counter): MFU and the plan agree
        self.flops_per_token = training_flops(cfg, seq_len).total
        self.device, self.world_size = device, world_size
        self.peak, self.peak_source = peak_tflops(device, compute_dtype, configured_peak, hardware)
        log.info("MFU: %.3g GFLOP per token (model FLOPs of a training step) over %d x %.4g TFLOP/s (%s); "
                 "peak memory: %s", self.flops_per_token / 1e9, world_size, self.peak, self.peak_source,
                 "CUDA memory allocated (main rank)" if device.type == "cuda" else "host RSS (main rank)")

    def figures(self, tokens_per_s: float) -> dict[str, float]:
        mfu = self.flops_per_token * tokens_per_s / (self.world_size * self.peak * 1e12)
        return {"mfu": mfu, "peak_mem_gib": peak_memory_gib(self.device)[0]}
