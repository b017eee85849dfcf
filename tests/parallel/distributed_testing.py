"""Run a test function in N gloo processes (torch.multiprocessing), with a deadline so a hang fails."""
import datetime
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A collective waiting this long has lost its peers: fail it rather than block CI.
COLLECTIVE_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)  # tests share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, *args, timeout: float = 120) -> None:
    """fn(rank, world, *args) on `world` processes; a worker's exception (an assertion) fails the caller.
    `fn` must be a module-level function (spawned processes import it)."""
    ctx = mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world} processes did not finish within {timeout}s")
