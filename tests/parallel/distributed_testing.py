"""The one launcher of multi-process tests (and of the pipeline benchmark): run a function in N gloo
processes with a deadline, so that a hang fails instead of blocking CI.

Ranks are forked from a forkserver that has imported torch once (a fresh interpreter per rank costs
seconds on a 2-core machine); each gets a gloo process group whose collectives time out with the
test, and all are killed if they do not finish in time. `fn` must be importable (module level).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "dsv3.parallel.pipeline"])
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` processes joined by a gloo group; return the
    results by rank (through `torch.save`: tensors, numbers, strings, lists and dicts of them).
    Raises RuntimeError with a rank's traceback if one fails, TimeoutError after killing all ranks if
    they are not done within `timeout` seconds."""
    ctx = _context()
    results: queue.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, rank, world_size, port, timeout, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
                if dead and results.empty():
                    raise RuntimeError(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) "
                                       "without a result")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)}: ranks {missing} did not finish within "
                                       f"{timeout:.0f} s (deadlock?)") from None
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=True)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
    return [out[r] for r in range(world_size)]


def run_workers(fn: Callable[..., None], world: int, *args: Any, timeout: float = 120.0) -> None:
    """`run_ranks` for a function that only asserts: a rank's failed assertion fails the caller."""
    run_ranks(fn, world, *args, timeout=timeout)


def _child(fn, rank, world_size, port, timeout, args, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)   # ranks share the cores; also keeps kernels' reduction order fixed
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        results.close()
        results.join_thread()   # the result is flushed to the pipe before the hard exit below
        os._exit(0)   # skip interpreter teardown (gloo threads) so the rank ends promptly
