"""What a dsv3 process's exit code means (every entry point and rank alike).

| code      | meaning                                                                                     |
|-----------|---------------------------------------------------------------------------------------------|
| 0         | done                                                                                        |
| 2         | bad input, before any training: an invalid config, a damaged or refused checkpoint          |
| 3         | diverged: non-finite losses or gradients (train.on_nonfinite); nothing non-finite was saved |
| 128 + sig | stopped by a signal (SIGTERM 143, SIGINT 130, SIGUSR1 138) after saving (checkpoint.on_signal) |

Under torchrun these are the workers' codes (its summary lists them as `exitcode`); torchrun itself
exits 1 whenever a worker fails.
"""
import signal

OK = 0
BAD_INPUT = 2
DIVERGED = 3


def signalled(signum: int) -> int:
    return 128 + int(signal.Signals(signum))
