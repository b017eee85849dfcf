"""How the benchmarks time a call: one way, so that their numbers mean the same thing.

On a GPU, CUDA events around `iters` back-to-back calls after `warmup` calls and a synchronize (the
time the device spent, launch gaps included, without a host round trip per call); on a CPU, the wall
clock around the same loop. Seconds per call, the mean over the loop.
"""
import time

import torch


def seconds_per_call(fn, device: torch.device, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()  # warm-up (and first-touch allocation, autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters
