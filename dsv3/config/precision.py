"""What `precision.dtype` means on a device: the autocast format of the forward/backward and the dtype
the kernels are chosen for (fp16's loss scaler: dsv3/train/loss_scale.py). Parameters, gradients and optimizer state stay fp32
(master weights) in every format; the rules of which device can run which format are in
dsv3/train/config_rules.py (bf16, fp16) and dsv3/fp8/config_rules.py (fp8).

- fp32: no autocast.
- bf16: bf16 autocast (CUDA compute capability 8.0+, and CPU).
- fp16: fp16 autocast and dynamic loss scaling: fp16's 5 exponent bits flush small gradients to zero
  without it (the format of GPUs without bf16: Turing, RTX 20xx).
- fp8: DeepSeek-V3's recipe (dsv3/fp8/) on top of bf16 autocast on a GPU; on CPU its exact emulation
  in fp32, without autocast.
"""
import contextlib
from contextlib import AbstractContextManager
from typing import Optional

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


def autocast_dtype(precision: str, device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in, None for no autocast."""
    if precision == "bf16" or (precision == "fp8" and device_type == "cuda"):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None


def compute_dtype(precision: str, device_type: str) -> torch.dtype:
    """The dtype the routed experts' kernels see (their implementation is chosen for it)."""
    return autocast_dtype(precision, device_type) or torch.float32


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    dtype = autocast_dtype(precision, device_type)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)



def device_type(train_device: str) -> str:
    """"cuda" or "cpu": where a run with `train.device` will compute (auto: a GPU if one is visible). The
    rules judge precision and kernels for it; train.device=cuda without a GPU is the train.device rule's."""
    return "cuda" if train_device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
