"""Step 1 of the GPU check: what this machine is, and its two ceilings measured now.

    python benchmarks/gpu/env.py OUT.json

GPU, driver, CUDA, torch/triton versions, compute capability, and the two rates every other number
is read against: a dense bf16 GEMM (8192^3, torch.matmul -> cuBLAS) in TFLOP/s and a device-to-device
copy in GB/s (bytes read + written). Without a GPU it records the CPU side and says so.
"""
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.timing import seconds_per_call  # noqa: E402


def _smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"unavailable: {exc}"}
    return {"nvidia_smi": out}


def _cuda_rates() -> dict:
    cuda = torch.device("cuda")
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm = 2 * n ** 3 / seconds_per_call(lambda: a @ b, cuda, 20, warmup=3) / 1e12
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far past the L2
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / seconds_per_call(lambda: dst.copy_(src), cuda, 20, warmup=3) / 1e9
    return {"bf16_gemm_tflops": gemm, "copy_gb_per_s": copy}


def main() -> int:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1), **_smi(), **_cuda_rates())
    else:
        env["gpu"] = "none (dry run: nothing below is a GPU measurement)"
    with open(sys.argv[1], "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
