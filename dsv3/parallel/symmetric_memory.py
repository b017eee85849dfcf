"""Symmetric memory for the ranks of one node: every rank of a process group owns one buffer, and every
rank maps every other rank's, so a kernel can write straight into a peer's memory.

Host buffers are POSIX shared memory segments (`shm_open` + `mmap`); GPU buffers are `cudaMalloc`
allocations shared by CUDA IPC handles (peer access over NVLink or PCIe). Creating, resizing and
closing are collective over the group; the sizes are known to every rank (each rank passes the list of
all ranks' sizes), so no rank needs to ask another what to map. A segment's name is removed from
/dev/shm as soon as every peer has mapped it: nothing is left behind however the processes end.
"""
from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.kernels.dispatch import extension

PAGE = 4096


@dataclass(frozen=True)
class Peers:
    """The ranks of a group as the transport needs them: who they are, and that they share a node."""

    group: dist.ProcessGroup
    rank: int            # this process's rank in the group
    size: int
    global_ranks: tuple[int, ...]
    pids: tuple[int, ...]
    start_times: tuple[int, ...]   # process start times (/proc), which with the pid name a process for good
    prefix: str                    # unique per group instance: names of its shared memory segments

    @staticmethod
    def gather(group: dist.ProcessGroup) -> "Peers":
        """Collective: learn every rank's host, pid and start time; refuse ranks on different hosts."""
        ext = extension()
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        mine = (socket.gethostname(), os.getpid(), ext.process_start_time(os.getpid()), secrets.token_hex(6))
        infos: list = [None] * size
        dist.all_gather_object(infos, mine, group=group)
        global_ranks = tuple(dist.get_global_rank(group, r) for r in range(size))
        hosts = {info[0] for info in infos}
        if len(hosts) > 1:
            by_host = {h: [g for g, info in zip(global_ranks, infos) if info[0] == h] for h in sorted(hosts)}
            raise ValueError(f"parallel.ep_transport=direct: the ranks of an EP group must share a node, but this "
                             f"group spans hosts {by_host}; use parallel.ep_transport=all_to_all across nodes")
        return Peers(group, rank, size, global_ranks, tuple(i[1] for i in infos), tuple(i[2] for i in infos),
                     f"/dsv3-{infos[0][3]}")

    def liveness(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pids, start times) for the flag waits' liveness checks; pid 0 (no check) for a peer whose
        process is not visible from here (another PID namespace): then only the timeout applies."""
        ext = extension()
        pids = [p if ext.process_start_time(p) == s else 0 for p, s in zip(self.pids, self.start_times)]
        return torch.tensor(pids, dtype=torch.int64), torch.tensor(self.start_times, dtype=torch.int64)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class SymmetricBuffer:
    """One buffer per rank of `peers`, each mapped by every rank: `addresses[r]` is rank r's buffer as
    seen from this process, `sizes[r]` its size in bytes. `device`: cpu (POSIX shared memory) or cuda
    (CUDA IPC). Collective: every rank constructs, resizes and closes it in the same order."""

    def __init__(self, peers: Peers, tag: str, sizes: list[int], device: torch.device):
        self.peers, self.tag, self.device = peers, tag, device
        self.generation = 0
        self.sizes: list[int] = [0] * peers.size
        self.addresses: list[int] = [0] * peers.size
        self._own: int = 0   # address of this rank's allocation (cuda: the cudaMalloc pointer)
        self.resize(sizes)

    @property
    def address(self) -> int:
        """This rank's own buffer."""
        return self.addresses[self.peers.rank]

    def resize(self, sizes: list[int]) -> None:
        """Collective: give rank r a buffer of at least sizes[r] bytes (rounded up to pages). Ranks whose
        size does not change keep their buffer and its contents; the others get fresh, zeroed memory."""
        sizes = [_round_up(max(s, 1), PAGE) for s in sizes]
        changed = [r for r in range(self.peers.size) if sizes[r] != self.sizes[r]]
        if not changed:
            return
        self.generation += 1
        if self.device.type == "cuda":
            self._resize_cuda(sizes, changed)
        else:
            self._resize_host(sizes, changed)
        self.sizes = sizes

    def _name(self, rank: int) -> str:
        return f"{self.peers.prefix}-{self.tag}-r{rank}-g{self.generation}"

    def _resize_host(self, sizes: list[int], changed: list[int]) -> None:
        ext, me = extension(), self.peers.rank
        fresh = ext.shm_create(self._name(me), sizes[me]) if me in changed else None
        self.peers.barrier()  # every changed segment exists
        old = {r: (self.addresses[r], self.sizes[r]) for r in changed if self.addresses[r]}
        for r in changed:
            self.addresses[r] = fresh if r == me else ext.shm_map(self._name(r), sizes[r])
        self.peers.barrier()  # every peer has mapped it: the names can go
        if me in changed:
            ext.shm_unlink(self._name(me))
        for address, size in old.values():
            ext.shm_unmap(address, size)

    def _resize_cuda(self, sizes: list[int], changed: list[int]) -> None:
        ext, me, dev = extension(), self.peers.rank, self.device.index
        torch.cuda.synchronize(self.device)  # no kernel still uses a buffer about to go
        handle = None
        old_own = self._own if me in changed else 0
        if me in changed:
            self._own, handle = ext.cuda_ipc_alloc(sizes[me], dev)
            torch.cuda.synchronize(self.device)  # the zeroing (cudaMemset is asynchronous) is done
        handles: list = [None] * self.peers.size
        dist.all_gather_object(handles, handle, group=self.peers.group)
        for r in changed:
            if r != me and self.addresses[r]:
                ext.cuda_ipc_close(self.addresses[r], dev)
            self.addresses[r] = self._own if r == me else ext.cuda_ipc_open(handles[r], dev)
        self.peers.barrier()  # every peer closed its handle of the old buffer
        if old_own:
            ext.cuda_free(old_own, dev)

    def close(self) -> None:
        """Collective: unmap every buffer and free this rank's."""
        ext, me = extension(), self.peers.rank
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for r, address in enumerate(self.addresses):
                if address and r != me:
                    ext.cuda_ipc_close(address, self.device.index)
            self.peers.barrier()
            if self._own:
                ext.cuda_free(self._own, self.device.index)
        else:
            for address, size in zip(self.addresses, self.sizes):
                if address:
                    ext.shm_unmap(address, size)
        self.addresses, self.sizes, self._own = [0] * self.peers.size, [0] * self.peers.size, 0

    def view(self, rank: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor over rank `rank`'s buffer from byte `offset` (no copy, no ownership: valid until the
        buffer is resized or closed)."""
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset + nbytes > self.sizes[rank]:
            raise IndexError(f"{self.tag}: a view of {nbytes} bytes at {offset} passes the end of rank {rank}'s "
                             f"buffer ({self.sizes[rank]} bytes)")
        return extension().view(self.addresses[rank] + offset, list(shape), dtype, self.device)
