"""Peak memory of a piece of work, measured: on CUDA the caching allocator's peak of allocated bytes;
on CPU the C library's allocated bytes (glibc mallinfo2: heap in use plus mmapped blocks, which is where
torch's CPU tensors live), sampled after every aten operation through a TorchDispatchMode, so a
tensor alive for one operation counts. The CPU figure includes every other malloc of the process; a
difference between two runs of the same work is the difference of what the tensors needed.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    return f


_MALLINFO = _mallinfo2()


def cpu_allocated_bytes() -> int:
    """Bytes the C allocator has handed out and not taken back (glibc >= 2.33)."""
    if _MALLINFO is None:
        raise RuntimeError("measuring CPU memory needs glibc's mallinfo2 (glibc >= 2.33)")
    m = _MALLINFO()
    return int(m.uordblks + m.hblkhd)


class _Sampler(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = cpu_allocated_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, cpu_allocated_bytes())
        return out


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes` (peak during the block) and `m.start_bytes`.

    On CPU the sampling mode sees the operations of this thread and of the autograd engine's backward
    (which runs them on the calling thread for CPU tensors)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.start_bytes = 0
        self.peak_bytes = 0
        self._sampler: Optional[_Sampler] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = cpu_allocated_bytes()
            self._sampler = _Sampler()
            self._sampler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._sampler.__exit__(*exc)
            self.peak_bytes = max(self._sampler.peak, cpu_allocated_bytes())
