"""Tests of the GPU paths, run by the prepared GPU check (`benchmarks/gpu/check.sh`) on a CUDA machine.

Every test here is marked `cuda` and compares what the GPU computes with an independent result
computed on the CPU from the same inputs (the plain-PyTorch twins, float64 products, or the host
build of the csrc/ kernels). On a machine without a GPU they are skipped, loudly: the skip reason
says that nothing of the GPU path was checked.

`DSV3_GPU_DRY_RUN=1` (with TRITON_INTERPRET=1, set by `check.sh --dry-run`) runs the same tests on
the CPU, Triton in its interpreter and small shapes only: it checks the tests themselves, not a GPU.
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "kernels"))  # kernel_cases
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "csrc"))     # dispatch_testing


DRY_RUN = os.environ.get("DSV3_GPU_DRY_RUN") == "1"
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")


def pytest_collection_modifyitems(config, items):
    here = [i for i in items if str(i.fspath).startswith(HERE)]
    for item in here:
        item.add_marker(pytest.mark.cuda)
    if not torch.cuda.is_available() and not DRY_RUN:
        skip = pytest.mark.skip(reason="no CUDA device: the GPU path was NOT checked (run benchmarks/gpu/check.sh "
                                       "on a GPU machine)")
        for item in here:
            item.add_marker(skip)


def capability() -> tuple[int, int]:
    """The GPU's compute capability; in a dry run, Hopper's (every path is interpretable)."""
    if DRY_RUN:
        return (9, 0)
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


needs_fp8 = pytest.mark.skipif(capability() < (8, 9), reason="FP8 tensor cores need compute capability 8.9+")
full_size = pytest.mark.skipif(DRY_RUN, reason="full-size shape: too slow for the Triton interpreter (dry run)")
