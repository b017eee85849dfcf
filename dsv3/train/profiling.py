"""`train.profile_steps=[a, b]`: a torch.profiler trace of training steps a..b (1-based, as the progress
line counts them), with shapes and memory, written by every rank to <run dir>/profile/:

- `rank{r}.steps{a}-{b}.pt.trace.json`: the Chrome trace (Perfetto UI, chrome://tracing, TensorBoard's
  profiler plugin); each step is a `ProfilerStep#n` range; allocations appear as `[memory]` events;
- `rank{r}.steps{a}-{b}.txt`: operators by self time, with their memory (`CPU Mem`, `CUDA Mem`);
- on CUDA `rank{r}.steps{a}-{b}.memory.pickle`: the allocator's history (PyTorch's memory_viz page).
"""
import contextlib
import logging
import os
from typing import Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

log = logging.getLogger("dsv3")


class StepProfiler:
    def __init__(self, steps: list[int], run_dir: str, rank: int, device: torch.device):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.dir, self.rank, self.device = os.path.join(run_dir, "profile"), rank, device
        self._prof: Optional[profile] = None

    @property
    def stem(self) -> str:
        return os.path.join(self.dir, f"rank{self.rank}.steps{self.first}-{self.last}")

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wraps the training step numbered `step`; profiles it if it is in [a, b]."""
        if self._prof is None and self.first <= step <= self.last:
            self._start(step)
        if self._prof is None:
            yield
            return
        with record_function(f"ProfilerStep#{step}"):
            yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels inside the trace
        if step >= self.last:
            self.close()

    def _start(self, step: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True)
        self._prof.start()
        if self.rank == 0:
            log.info("profiling steps %d-%d into %s", step, self.last, self.dir)

    def close(self) -> None:
        """Stop and write the files (also when the run ends inside the range)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.stop()
        prof.export_chrome_trace(self.stem + ".pt.trace.json")
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with open(self.stem + ".txt", "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        written = [self.stem + ".pt.trace.json", self.stem + ".txt"]
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(self.stem + ".memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(self.stem + ".memory.pickle")
        if self.rank == 0:
            log.info("profile written: %s", ", ".join(written))
