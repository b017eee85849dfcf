"""How the expert-parallel dispatcher moves rows between the ranks of an EP group (`parallel.ep_transport`).

An exchange sends, from every rank to every rank, rows that a kernel produces from local tensors: a
gather (dispatch, and the combine's return of expert outputs), a gather quantized to FP8 in 1x128 tiles
(FP8 dispatch), or a reduction of gathered rows (the backward of a gather: dispatch's backward). Each
rank receives the rows of all sources concatenated in source order, each source's in its send order:
what `all_to_all_single` delivers. Two transports do this with the same kernels and deliver the same
bytes, so the training run is bit-identical whichever runs:

- `AllToAllTransport` (`all_to_all`): the kernel writes a local send buffer, then
  `dist.all_to_all_single` (NCCL, gloo) moves it. Works across nodes.
- `DirectTransport` (`direct`, the DeepEP-style intranode path): every rank maps every other rank's
  receive buffers (`symmetric_memory.py`), the kernel writes each row straight into its destination's
  buffer at the row where the all-to-all would have put it, and a flag per (source, destination) pair
  says the rows are there (protocol and memory ordering: csrc/transport_kernels.cuh). No send buffer,
  no library collective, no host round trip per exchange beyond the dispatch's counts. Needs every rank
  of the group on one node.

Both are asynchronous, for the F&B overlap: `issue` starts an exchange and returns at once (direct:
the rows are written and flagged; all_to_all: the collective runs on its own thread or stream),
`wait` returns the received tensors, `release` hands them back (direct: the receive slot may be reused;
the tensors are views into it and must be consumed before). Every rank of the group must issue the
same exchanges in the same order, as for any collective; up to `slots` of them may be in flight.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.distributed as dist

from dsv3.kernels import dispatch as kernels
from dsv3.kernels.dispatch_reference import QUANT_GROUP
from dsv3.parallel.symmetric_memory import Peers, SymmetricBuffer

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "all_to_all", "direct")


def resolve_transport(requested: str, ep: int, local_world_size: int) -> tuple[str, str]:
    """(transport, why) for `parallel.ep_transport`: `auto` is direct when every EP group lies inside one
    node, else all_to_all. EP groups are `ep` consecutive ranks starting at a multiple of `ep`, and
    torchrun numbers ranks node by node, so they lie inside nodes iff the ranks per node are a multiple
    of ep."""
    on_node = local_world_size % ep == 0
    if requested != "auto":
        return requested, "as configured"
    if on_node:
        return "direct", f"auto: each EP group of {ep} ranks lies inside a node of {local_world_size}"
    return "all_to_all", f"auto: EP groups of {ep} ranks span nodes of {local_world_size} ranks"


def gpus_reach_each_other(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Collective over the group: whether every rank's GPU can access every other's memory (NVLink or
    PCIe peer-to-peer; consumer cards often cannot), which CUDA IPC writes need."""
    devices: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(devices, device.index, group=group)
    mine = all(d == device.index or torch.cuda.can_device_access_peer(device.index, d) for d in devices)
    everyone: list = [None] * len(devices)
    dist.all_gather_object(everyone, mine, group=group)
    return all(everyone)


# -- what an exchange sends ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Gather:
    """Send row m = scale[m] * x[src[m]] (src -1: a zero row), in `dtype` (default x's; a plain copy
    when neither scale nor dtype change the row)."""

    x: torch.Tensor
    src: torch.Tensor
    scale: torch.Tensor | None = None
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class GatherFp8:
    """Send row m = x[src[m]] quantized to E4M3 in 1x128 tiles with power-of-two scales; received as two
    tensors, the E4M3 rows [n, H] and their scales [n, ceil(H/128)] fp32."""

    x: torch.Tensor
    src: torch.Tensor


@dataclass(frozen=True)
class Reduce:
    """Send row m = sum_j x[index[m, j]] (index -1: skipped), fp32 accumulation in order j, in `dtype`
    (default x's): the backward of a gather."""

    x: torch.Tensor
    index: torch.Tensor
    dtype: torch.dtype | None = None


Rows = Union[Gather, GatherFp8, Reduce]


def _n_rows(rows: Rows) -> int:
    return (rows.index if isinstance(rows, Reduce) else rows.src).shape[0]


def _parts(rows: Rows) -> list[tuple[int, torch.dtype]]:
    """(row width, dtype) of each tensor the receiver gets for `rows`."""
    h = rows.x.shape[1]
    if isinstance(rows, GatherFp8):
        return [(h, torch.float8_e4m3fn), (-(-h // QUANT_GROUP), torch.float32)]
    return [(h, rows.dtype or rows.x.dtype)]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Splits:
    """Rows each rank sends each other rank in one exchange. `matrix[s][d]`: rows rank s sends rank d,
    known to every rank (the direct transport needs it: where a source's rows start at a destination
    depends on what the sources before it send there); None for the all-to-all."""

    send: tuple[int, ...]
    recv: tuple[int, ...]
    matrix: tuple[tuple[int, ...], ...] | None = None

    def reversed(self) -> "Splits":
        """The splits of the exchange that sends every row back to where it came from."""
        matrix = None if self.matrix is None else tuple(zip(*self.matrix))
        return Splits(self.recv, self.send, matrix)


# -- all_to_all ------------------------------------------------------------------------------------------

def _local_rows(rows: Rows) -> list[torch.Tensor]:
    """The send buffer of `rows`, made by the same kernels the direct transport runs into peers' memory."""
    if isinstance(rows, GatherFp8):
        return list(kernels.permute_fp8(rows.x, rows.src))
    if isinstance(rows, Reduce):
        return [kernels.extension().combine(rows.x, rows.index, None, rows.dtype)]
    return [kernels.gather_rows(rows.x, rows.src, rows.scale, rows.dtype)]


@dataclass
class _AllToAllPending:
    received: list[torch.Tensor]
    works: list
    keep: list[torch.Tensor]   # send buffers, alive until the collectives are done


class AllToAllTransport:
    """Rows through `dist.all_to_all_single` (asynchronous: the collective runs on the backend's own
    thread or stream between `issue` and `wait`)."""

    kind = "all_to_all"

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.n_ranks, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def exchange_counts(self, counts: torch.Tensor) -> list[Splits]:
        """counts [R, c] (row d: what this rank sends rank d) -> c Splits, one per column."""
        received = counts.new_empty(counts.shape)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        send, recv = counts.tolist(), received.tolist()
        return [Splits(tuple(r[i] for r in send), tuple(r[i] for r in recv)) for i in range(counts.shape[1])]

    def issue(self, rows: list[Rows], splits: Splits) -> _AllToAllPending:
        received, works, keep = [], [], []
        for spec in rows:
            for send in _local_rows(spec):
                # As bytes where a dtype is not one every backend takes (gloo has no float8).
                wire = send.view(torch.uint8) if send.dtype == torch.float8_e4m3fn else send
                out = wire.new_empty((sum(splits.recv), *wire.shape[1:]))
                works.append(dist.all_to_all_single(out, wire.contiguous(), list(splits.recv), list(splits.send),
                                                    group=self.group, async_op=True))
                received.append(out.view(send.dtype))
                keep.append(wire)
        return _AllToAllPending(received, works, keep)

    def wait(self, pending: _AllToAllPending) -> list[torch.Tensor]:
        for work in pending.works:
            work.wait()
        pending.keep.clear()
        return pending.received

    def release(self, pending: _AllToAllPending) -> None:
        """Nothing to hand back: the received tensors are the caller's."""

    def close(self) -> None:
        pass


# -- direct ----------------------------------------------------------------------------------------------

_ALIGN = 128          # every received tensor starts on a 128-byte boundary (wide copies, coalescing)
_LINE = 8             # int64 words per flag: one 64-byte cache line each, so writers never share a line
_MAX_COUNT_COLUMNS = 4
DEFAULT_TIMEOUT_S = 600.0   # as the trainer's process group: a peer that is alive but silent this long has hung


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class _DirectPending:
    round: int
    slot: int
    shapes: list[tuple[int, torch.dtype, int]]   # (width, dtype, byte offset in this rank's slot)
    n_recv: int
    waited: bool = False
    released: bool = False


@dataclass
class _Flags:
    """Addresses (as int64 tensors on the flags' device) of the flag words a rank reads and writes."""

    ready_in: list[torch.Tensor] = field(default_factory=list)     # [slot] -> [R] ready[k][s] here
    ready_out: list[torch.Tensor] = field(default_factory=list)    # [slot] -> [R] ready[k][me] at each peer
    free_mine: list[torch.Tensor] = field(default_factory=list)    # [slot] -> [1] free[k] here
    free_peers: list[torch.Tensor] = field(default_factory=list)   # [slot] -> [R] free[k] at each peer
    count_in: list[torch.Tensor] = field(default_factory=list)     # [parity] -> [R] count_ready[p][s] here
    count_out: list[torch.Tensor] = field(default_factory=list)    # [parity] -> [R] count_ready[p][me] at each peer
    count_rows: list[torch.Tensor] = field(default_factory=list)   # [parity] -> [R] my count record at each peer


class DirectTransport:
    """Intranode exchange through symmetric buffers: each rank writes its rows straight into the
    destination's receive slot and raises a flag per (source, destination) pair (protocol:
    csrc/transport_kernels.cuh). `slots` receive slots per rank: how many exchanges may be in flight;
    each grows (collectively, rarely: to the next power of two) when an exchange needs more room.
    `timeout_s`: how long a rank waits for a live peer before it gives up; a peer process that exits
    is noticed within ~20 ms (host) and ends the exchange with an error naming it.

    The control words (flags and the counts exchange) live in host shared memory; on a GPU the data
    flags live in GPU memory beside the slots, so that kernels can signal and wait on them."""

    kind = "direct"

    def __init__(self, group: dist.ProcessGroup, device: torch.device, slots: int = 2,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if slots < 1:
            raise ValueError(f"DirectTransport: slots={slots} must be >= 1")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"DirectTransport: device {device} is neither cpu (shared memory) nor cuda (CUDA IPC)")
        self.device, self.n_slots, self.timeout_s = device, slots, float(timeout_s)
        self.peers = Peers.gather(group)
        self.group, self.n_ranks, self.rank = group, self.peers.size, self.peers.rank
        R, S = self.n_ranks, slots
        self._pids, self._starts = self.peers.liveness()
        # Host control segment, in int64 words: data flags (host transport), count flags, count records.
        self._ready_at = lambda k, s: (k * R + s) * _LINE
        self._free_at = lambda k: (S * R + k) * _LINE
        self._count_flag_at = lambda p, s: (S * R + S + p * R + s) * _LINE
        self._count_base = (S * R + S + 2 * R) * _LINE
        self._record_words = R * _MAX_COUNT_COLUMNS
        self._count_at = lambda p, s: self._count_base + (p * R + s) * self._record_words
        control_words = self._count_base + 2 * R * self._record_words
        self.control = SymmetricBuffer(self.peers, "ctl", [control_words * 8] * R, torch.device("cpu"))
        on_gpu = device.type == "cuda"
        self.data_flags = (SymmetricBuffer(self.peers, "flg", [self._free_at(S) * 8] * R, device) if on_gpu
                           else self.control)
        # Every flag starts at -1 ("round -1 done"); set before any peer can signal (the barrier below).
        self.control.view(self.rank, 0, (control_words,), torch.int64).fill_(-1)
        if on_gpu:
            self.data_flags.view(self.rank, 0, (self._free_at(S),), torch.int64).fill_(-1)
            torch.cuda.synchronize(device)  # before any peer may signal: the fill must not land after it
        self.slots = [SymmetricBuffer(self.peers, f"slot{k}", [0] * R, device) for k in range(S)]
        self._flags = self._flag_addresses()
        self._round = 0                      # data exchanges issued
        self._released = [-1] * S           # last round released per slot
        self._count_round = 0
        self.peers.barrier()

    # -- flag addresses ----------------------------------------------------------------------------------
    def _addresses(self, buf: SymmetricBuffer, words: list[tuple[int, int]]) -> torch.Tensor:
        """int64 addresses of (rank, word) pairs of `buf`, on `buf`'s device."""
        return torch.tensor([buf.addresses[r] + 8 * w for r, w in words], dtype=torch.int64, device=buf.device)

    def _flag_addresses(self) -> _Flags:
        f, R, me, ctl, dat = _Flags(), self.n_ranks, self.rank, self.control, self.data_flags
        for k in range(self.n_slots):
            f.ready_in.append(self._addresses(dat, [(me, self._ready_at(k, s)) for s in range(R)]))
            f.ready_out.append(self._addresses(dat, [(d, self._ready_at(k, me)) for d in range(R)]))
            f.free_mine.append(self._addresses(dat, [(me, self._free_at(k))]))
            f.free_peers.append(self._addresses(dat, [(d, self._free_at(k)) for d in range(R)]))
        for p in range(2):
            f.count_in.append(self._addresses(ctl, [(me, self._count_flag_at(p, s)) for s in range(R)]))
            f.count_out.append(self._addresses(ctl, [(d, self._count_flag_at(p, me)) for d in range(R)]))
            f.count_rows.append(self._addresses(ctl, [(d, self._count_at(p, me)) for d in range(R)]))
        return f

    def _wait(self, flags: torch.Tensor, target: int, what: str) -> None:
        kernels.extension().wait_flags(flags, target, self.timeout_s, self._pids, self._starts,
                                       f"ep transport (ranks {list(self.peers.global_ranks)}), {what}")

    # -- counts ------------------------------------------------------------------------------------------
    def exchange_counts(self, counts: torch.Tensor) -> list[Splits]:
        """counts [R, c] (row d: what this rank sends rank d) -> c Splits with the full count matrix.

        Every rank writes its counts into every rank's record area and flags it; rounds alternate between
        two areas. That is enough without a "consumed" flag because the call is synchronous: a rank in
        round c + 2 has seen every flag of round c + 1, which every rank raises only after it read round c."""
        R, c = self.n_ranks, counts.shape[1]
        if counts.shape[0] != R or not 1 <= c <= _MAX_COUNT_COLUMNS:
            raise ValueError(f"exchange_counts: counts must be [{R}, 1..{_MAX_COUNT_COLUMNS}], "
                             f"got {list(counts.shape)}")
        n, p = self._count_round, self._count_round % 2
        self._count_round += 1
        record = torch.zeros(R, _MAX_COUNT_COLUMNS, dtype=torch.int64)
        record[:, :c] = counts.cpu()
        ext, f = kernels.extension(), self._flags
        ext.put_rows(record.view(1, -1), torch.zeros(R, dtype=torch.int64), f.count_rows[p])
        ext.signal(f.count_out[p], n)
        self._wait(f.count_in[p], n, f"counts exchange {n}")
        area = self.control.view(self.rank, 8 * self._count_at(p, 0), (R, R, _MAX_COUNT_COLUMNS), torch.int64)
        m = area[:, :, :c].tolist()   # a copy: the area is rewritten two rounds later
        return [Splits(matrix=tuple(tuple(m[s][d][i] for d in range(R)) for s in range(R)),
                       send=tuple(m[self.rank][d][i] for d in range(R)),
                       recv=tuple(m[s][self.rank][i] for s in range(R))) for i in range(c)]

    # -- rows ----------------------------------------------------------------------------------------------
    def _slot_layout(self, n_recv: int, parts: list[tuple[int, torch.dtype]]) -> tuple[list[int], int]:
        """Byte offsets of each received tensor in a slot holding n_recv rows of each, and the total."""
        offsets, end = [], 0
        for width, dtype in parts:
            offsets.append(end)
            end += _align(n_recv * width * _element_size(dtype))
        return offsets, end

    def _ensure_capacity(self, slot: int, need: list[int]) -> None:
        """Collective (every rank computes the same `need` from the same count matrix): grow the slot of
        every rank whose exchange does not fit, to the next power of two."""
        buf = self.slots[slot]
        if all(n <= size for n, size in zip(need, buf.sizes)):
            return
        sizes = [size if n <= size else 1 << max(16, (n - 1).bit_length()) for n, size in zip(need, buf.sizes)]
        log.debug("ep transport: slot %d grows to %s bytes", slot, sizes)
        buf.resize(sizes)

    def issue(self, rows: list[Rows], splits: Splits) -> _DirectPending:
        if splits.matrix is None:
            raise ValueError("DirectTransport.issue: the splits have no count matrix; make them with this "
                             "transport's exchange_counts (or reverse such splits)")
        R, me, S = self.n_ranks, self.rank, self.n_slots
        n, k = self._round, self._round % S
        if self._released[k] < n - S:
            raise RuntimeError(f"ep transport: exchange {n} needs receive slot {k}, which exchange {n - S} still "
                               f"holds (not released): at most {S} exchanges may be in flight")
        n_send = sum(splits.send)
        for spec in rows:
            if _n_rows(spec) != n_send:
                raise ValueError(f"DirectTransport.issue: {type(spec).__name__} has {_n_rows(spec)} rows, the "
                                 f"splits send {n_send}")
        self._round += 1
        parts = [p for spec in rows for p in _parts(spec)]
        recv_rows = [sum(splits.matrix[s][d] for s in range(R)) for d in range(R)]
        layouts = [self._slot_layout(recv_rows[d], parts) for d in range(R)]
        self._ensure_capacity(k, [total for _, total in layouts])

        ext, f, dev = kernels.extension(), self._flags, self.device
        # Write-after-read: every destination must be done reading what exchange n - S left in slot k.
        self._wait(f.free_peers[k], n - S, f"exchange {n}: waiting for slot {k} to be released")
        seg_end = torch.tensor(list(itertools.accumulate(splits.send)), dtype=torch.int64, device=dev)
        dst_row0 = torch.tensor([sum(splits.matrix[s][d] for s in range(me)) for d in range(R)], dtype=torch.int64,
                                device=dev)
        slot_base = self.slots[k].addresses

        def addresses(i: int) -> torch.Tensor:
            width, dtype = parts[i]
            base = torch.tensor([slot_base[d] + layouts[d][0][i] for d in range(R)], dtype=torch.int64, device=dev)
            return ext.row_addresses(seg_end, dst_row0, base, n_send, width * _element_size(dtype))

        i = 0
        for spec in rows:
            if isinstance(spec, GatherFp8):
                ext.put_rows_fp8(spec.x, spec.src, addresses(i), addresses(i + 1))
                i += 2
            elif isinstance(spec, Reduce):
                ext.put_reduce(spec.x, spec.index, addresses(i), None, spec.dtype)
                i += 1
            else:
                ext.put_rows(spec.x, spec.src, addresses(i), spec.scale, spec.dtype)
                i += 1
        ext.signal(f.ready_out[k], n)
        offsets = layouts[me][0]
        return _DirectPending(n, k, [(w, dt, o) for (w, dt), o in zip(parts, offsets)], recv_rows[me])

    def wait(self, pending: _DirectPending) -> list[torch.Tensor]:
        """The received tensors: views into this rank's receive slot, valid until `release`."""
        if pending.released:
            raise RuntimeError(f"ep transport: exchange {pending.round} was already released")
        if not pending.waited:
            self._wait(self._flags.ready_in[pending.slot], pending.round, f"exchange {pending.round}")
            pending.waited = True
        buf = self.slots[pending.slot]
        return [buf.view(self.rank, offset, (pending.n_recv, width), dtype) for width, dtype, offset in pending.shapes]

    def release(self, pending: _DirectPending) -> None:
        """Hand the slot back to the senders (after every read of the received views: on a GPU, after the
        kernels reading them, in stream order)."""
        if not pending.waited:
            raise RuntimeError(f"ep transport: exchange {pending.round} released before it was waited for")
        if pending.released:
            return
        kernels.extension().signal(self._flags.free_mine[pending.slot], pending.round)
        self._released[pending.slot] = pending.round
        pending.released = True

    def close(self) -> None:
        """Collective: unmap and free the buffers."""
        for buf in self.slots:
            buf.close()
        if self.data_flags is not self.control:
            self.data_flags.close()
        self.control.close()


Transport = Union[AllToAllTransport, DirectTransport]


def make_transport(kind: str, group: dist.ProcessGroup, device: torch.device, **options) -> Transport:
    """`kind`: all_to_all or direct (resolve `auto` first with `resolve_transport`)."""
    if kind == "all_to_all":
        return AllToAllTransport(group)
    if kind == "direct":
        return DirectTransport(group, device, **options)
    raise ValueError(f"parallel.ep_transport={kind!r}: must be one of {', '.join(TRANSPORTS[1:])}")


def local_world_size() -> int:
    """Processes per node as torchrun reports it (one node when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
