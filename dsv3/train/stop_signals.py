"""Stop cleanly on SIGTERM / SIGUSR1 / SIGINT: finish the step, save a checkpoint, exit (`checkpoint.on_signal`).

Preemption, `scancel` and SLURM's `--signal` deliver SIGTERM or SIGUSR1 to every process of a job
(torchrun passes SIGTERM and SIGINT on to its workers), Ctrl-C delivers SIGINT; each process gets it
at its own point of the step. Every rank only notes the signal; after each step the ranks agree on
it in one tiny all-reduce, so all of them save the same step and leave. A second Ctrl-C abandons
the step at once (KeyboardInterrupt): nothing is saved, and the last checkpoint is untouched, since a
save becomes visible only by its final rename.
"""
import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Context manager: while active, STOP_SIGNALS are recorded instead of ending the process."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step
        self.received = signum

    def agreed(self, device: torch.device) -> int:
        """The signal any rank has received (0: none). A collective: every rank calls it after each step."""
        if not self.enabled:
            return 0
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
