"""The expert all-to-alls of one rank, and the F&B pairs that hide them behind computation.

DualPipe exists for one reason (DeepSeek-V3 report §3.2.1): while one micro-batch's tokens travel
through the expert all-to-all, the other micro-batch of an F&B pair computes. Each chunk is a chain
of compute pieces separated by communication pieces (attention and router | dispatch all-to-all |
experts | combine all-to-all | shared experts and the next layer's attention ..., and the mirror
image in the backward). Here the pieces are not cut out of the model by hand: the two halves of a
pair run as two cooperative threads that hold a baton in turn, and the only place where a half gives
the baton away is an all-to-all: it is issued asynchronously (`async_op=True`), the other half
computes its next piece, and the all-to-all is waited on when the baton comes back, which is when its
result is needed. The exchanges are the EP transport's (`ep_transport.py`: issue, then wait), so
the model knows nothing of this, the forward and the autograd backward run unchanged, and exactly one half computes at any time: every op sees the same inputs in the same
order as without the overlap, and the losses are bit-identical.

The order in which the all-to-alls are issued is a function of the two chunks only, so every rank of
an EP group (the same stage(s), the same schedule) issues them in the same order, as collectives
need. On CPU gloo runs an asynchronous collective on its own threads, so the overlap is real there
too (benchmarks/overlap.py measures it); with NCCL an asynchronous collective runs on NCCL's own
stream and `wait()` only orders the compute stream after it (not yet measured on a GPU; the counts
exchange of dispatch reads sizes on the host, a synchronization a GPU implementation would avoid).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Time spent in the all-to-alls since the last `take()`, split by where they ran.

    in_flight: from issue to completion as the waiting side saw it (issue to the end of `wait()`).
    exposed: time a task sat in `wait()`, i.e. not hidden behind the other half's computation.
    """

    calls: int = 0
    pair_calls: int = 0
    in_flight_s: float = 0.0
    exposed_s: float = 0.0
    pair_in_flight_s: float = 0.0
    pair_exposed_s: float = 0.0
    bytes_sent: int = 0

    def add(self, in_pair: bool, in_flight: float, exposed: float, nbytes: int) -> None:
        self.calls += 1
        self.in_flight_s += in_flight
        self.exposed_s += exposed
        self.bytes_sent += nbytes
        if in_pair:
            self.pair_calls += 1
            self.pair_in_flight_s += in_flight
            self.pair_exposed_s += exposed


@dataclass
class _Pair:
    turn: Optional[str] = "F"
    done: dict = field(default_factory=lambda: {"F": False, "B": False})

    def other(self, task: str) -> str:
        return "B" if task == "F" else "F"


@dataclass
class _Ticket:
    """An issued exchange, as the Communicator tracks it."""

    task: Optional[str]
    passes: int
    issued: float
    nbytes: int


class OverlappedTransport:
    """An EP transport (dsv3/parallel/ep_transport.py) whose waits go through a Communicator: inside an
    overlapped F&B pair, the other half computes before this half waits. Same interface as the transport
    it wraps (`kind`, `exchange_counts`, `issue`, `wait`, `release`, `close`)."""

    def __init__(self, inner, comm: "Communicator"):
        self.inner, self.comm, self.kind = inner, comm, inner.kind

    def exchange_counts(self, counts: torch.Tensor):
        if self.kind != "all_to_all":   # the direct transport's counts are flags in shared memory
            return self.inner.exchange_counts(counts)
        from dsv3.parallel.ep_transport import Splits

        received = counts.new_empty(counts.shape)
        ticket = self.comm.issued(counts.numel() * counts.element_size())
        work = dist.all_to_all_single(received, counts.contiguous(), group=self.inner.group, async_op=True)
        self.comm.finish(ticket, work.wait)
        send, recv = counts.tolist(), received.tolist()
        return [Splits(tuple(r[i] for r in send), tuple(r[i] for r in recv)) for i in range(counts.shape[1])]

    def issue(self, rows: list, splits) -> tuple:
        width = sum(spec.x.shape[1] * spec.x.element_size() for spec in rows)
        ticket = self.comm.issued(sum(splits.send) * width)
        return ticket, self.inner.issue(rows, splits)

    def wait(self, pending: tuple) -> list[torch.Tensor]:
        ticket, inner = pending
        return self.comm.finish(ticket, lambda: self.inner.wait(inner))

    def release(self, pending: tuple) -> None:
        self.inner.release(pending[1])

    def close(self) -> None:
        self.inner.close()


class Communicator:
    """The expert exchanges of one rank (its dispatchers' transport, `wrap`ped), and the runner of the
    executor's F&B pairs (pass `run_pair` as the executor's overlap hook).

    overlap: interleave the two halves of a pair (False: forward, then backward).
    trace: a list to append (event, task, time) to, or None. Events: "run" (a task gets the baton),
        "issue" (it issued an all-to-all), "wait" (it starts waiting for one), "ready" (the wait ended),
        "end" (the task finished);
        task is "F"/"B" inside a pair, None outside. For tests and benchmarks.
    """

    def __init__(self, overlap: bool = False):
        self.overlap = overlap
        self.trace: Optional[list] = None
        self.stats = CommStats()
        self._cv = threading.Condition()
        self._pair: Optional[_Pair] = None
        self._in_pair = False
        self._passes = 0   # times the baton changed hands

    def take_stats(self) -> CommStats:
        stats, self.stats = self.stats, CommStats()
        return stats

    def _event(self, kind: str, task: Optional[str]) -> None:
        if self.trace is not None:
            self.trace.append((kind, task, time.perf_counter()))

    # -- the exchanges ----------------------------------------------------------------------------
    def wrap(self, transport) -> OverlappedTransport:
        """`transport` with its waits going through this Communicator."""
        return OverlappedTransport(transport, self)

    def issued(self, nbytes: int) -> _Ticket:
        """Record an exchange being issued by the half that holds the baton (None outside a pair)."""
        task = self._pair.turn if self._pair is not None else None
        self._event("issue", task)
        return _Ticket(task, self._passes, time.perf_counter(), nbytes)

    def finish(self, ticket: _Ticket, wait: Callable[[], object]):
        """`wait()` for an issued exchange. Inside an overlapped pair, the other half first computes up
        to its own next exchange, unless it has had a turn since this one was issued (several exchanges
        issued before their waits share one turn)."""
        pair = self._pair
        if pair is not None and self._passes == ticket.passes:
            self._give_baton(pair, ticket.task)
        self._event("wait", ticket.task)
        waited = time.perf_counter()
        result = wait()
        done = time.perf_counter()
        self._event("ready", ticket.task)
        self.stats.add(self._in_pair, done - ticket.issued, done - waited, ticket.nbytes)
        return result

    # -- the pair ----------------------------------------------------------------------------------
    def _give_baton(self, pair: _Pair, task: str) -> None:
        """Let the other half run until it gives the baton back (or finishes); no-op if it is done."""
        with self._cv:
            other = pair.other(task)
            if pair.done[other]:
                return
            pair.turn = other
            self._passes += 1
            self._cv.notify_all()
            self._cv.wait_for(lambda: pair.turn == task)
        self._event("run", task)

    def run_pair(self, fwd, bwd) -> None:
        """The executor's F&B hook: run `fwd.run()` and `bwd.run()` (the executor's ForwardTask and
        BackwardTask), interleaved at their all-to-alls when `overlap` is on."""
        self._in_pair = True
        try:
            if not self.overlap:
                fwd.run()
                bwd.run()
                return
            self._run_interleaved({"F": fwd.run, "B": bwd.run})
        finally:
            self._in_pair = False

    def _run_interleaved(self, tasks: dict[str, Callable[[], None]]) -> None:
        pair = _Pair()
        errors: list[BaseException] = []

        def body(name: str) -> None:
            with self._cv:
                self._cv.wait_for(lambda: pair.turn == name)
            self._event("run", name)
            try:
                tasks[name]()
            except BaseException as e:  # noqa: BLE001 (re-raised on the calling thread)
                errors.append(e)
            finally:
                self._event("end", name)
                with self._cv:
                    pair.done[name] = True
                    other = pair.other(name)
                    pair.turn = None if pair.done[other] else other
                    self._cv.notify_all()

        threads = [threading.Thread(target=body, args=(name,), name=f"dsv3-pair-{name}") for name in tasks]
        self._pair = pair
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self._pair = None
        if errors:
            raise errors[0]
