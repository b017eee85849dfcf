"""A pipeline schedule as data: per-rank instruction lists (docs/architecture.md, section 5).

One `Schedule` feeds the simulator (`simulator.py`), the executor (`executor.py`) and the tests.
Names follow the DeepSeek-V3 report's Table 2 and torch.distributed.pipelining:

- ``F``  forward of one micro-batch through one stage (a "chunk");
- ``B``  full backward of a chunk (input and weight gradients), Table 2's B;
- ``I``  backward for the input only (the zero-bubble paper's B);
- ``W``  backward for the weights only, deferred after its ``I``;
- ``FB`` a forward and a backward of two different micro-batches run as one overlapped pair
  (Table 2's F&B); its backward part is a ``B`` or an ``I``;
- ``SEND_ACT``/``RECV_ACT`` a stage's output activation, ``SEND_GRAD``/``RECV_GRAD`` the gradient
  of a stage's input, between two ranks.

A micro-batch travels through stages 0..S-1; `Schedule.route(mb)` says which rank runs each stage
for it. Usually that is one fixed map, but DualPipe feeds half the micro-batches from the other
end, so its route depends on the micro-batch.
"""
from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence


class Op(enum.Enum):
    F = "F"
    B = "B"
    I = "I"  # noqa: E741 (the established name of the input-gradient pass)
    W = "W"
    FB = "FB"
    SEND_ACT = "SEND_ACT"
    RECV_ACT = "RECV_ACT"
    SEND_GRAD = "SEND_GRAD"
    RECV_GRAD = "RECV_GRAD"


COMPUTE_OPS = (Op.F, Op.B, Op.I, Op.W, Op.FB)
COMM_OPS = (Op.SEND_ACT, Op.RECV_ACT, Op.SEND_GRAD, Op.RECV_GRAD)


@dataclass(frozen=True)
class Instr:
    """One instruction of one rank.

    For compute ops `stage` and `mb` name the chunk. For an ``FB`` pair, `pair` holds the forward
    and the backward instruction and `stage`/`mb` are unused (-1). For communication, `stage` is
    the stage that *produced* the tensor (its output for ACT, its input gradient for GRAD), so the
    sender's and the receiver's instruction name the same message; `peer` is the other rank.
    """

    op: Op
    stage: int = -1
    mb: int = -1
    peer: int = -1
    pair: tuple[Instr, Instr] | None = None

    @property
    def is_compute(self) -> bool:
        return self.op in COMPUTE_OPS

    @property
    def is_comm(self) -> bool:
        return self.op in COMM_OPS

    def parts(self) -> tuple[Instr, ...]:
        """The compute chunks this instruction runs (two for an ``FB`` pair)."""
        return self.pair if self.op is Op.FB else (self,)

    def message(self) -> tuple[str, int, int]:
        """Identity of the tensor a SEND/RECV moves: ("act"|"grad", producing stage, mb)."""
        kind = "act" if self.op in (Op.SEND_ACT, Op.RECV_ACT) else "grad"
        return kind, self.stage, self.mb

    def __repr__(self) -> str:
        if self.op is Op.FB:
            f, b = self.pair
            return f"({f!r}&{b!r})"
        if self.is_comm:
            arrow = "->" if self.op in (Op.SEND_ACT, Op.SEND_GRAD) else "<-"
            return f"{self.op.value}(s{self.stage},m{self.mb}){arrow}r{self.peer}"
        return f"{self.op.value}{self.mb}@s{self.stage}"


def pair(forward: Instr, backward: Instr) -> Instr:
    if forward.op is not Op.F or backward.op not in (Op.B, Op.I):
        raise ValueError(f"an FB pair is (F, B|I), got ({forward!r}, {backward!r})")
    return Instr(Op.FB, pair=(forward, backward))


@dataclass
class Schedule:
    """Per-rank instruction lists plus the placement of stages on ranks.

    Attributes:
        name: the generator's name ("1f1b", "zb1p", "dualpipe", "dualpipev").
        pp: number of pipeline ranks (config key ``parallel.pp``).
        n_stages: number of model stages S (pp, or 2·pp for DualPipeV).
        microbatches: number of micro-batches m (``parallel.microbatches``).
        routes: rank that runs each stage, one tuple of length S per distinct route; `route_of[mb]`
            indexes it (DualPipe: route 0 is ranks 0..pp-1, route 1 is pp-1..0).
        route_of: route index of each micro-batch.
        ranks: the instruction list of each rank.
    """

    name: str
    pp: int
    n_stages: int
    microbatches: int
    routes: tuple[tuple[int, ...], ...]
    route_of: tuple[int, ...]
    ranks: list[list[Instr]] = field(default_factory=list)

    def route(self, mb: int) -> tuple[int, ...]:
        return self.routes[self.route_of[mb]]

    def rank_of(self, stage: int, mb: int) -> int:
        return self.route(mb)[stage]

    def stages_on_rank(self, rank: int) -> list[int]:
        """Stages whose parameters live on `rank` (DualPipe: two, each also on the mirror rank)."""
        return sorted({s for r in self.routes for s, rr in enumerate(r) if rr == rank})

    def ranks_holding(self, stage: int) -> list[int]:
        return sorted({r[stage] for r in self.routes})

    def compute(self, rank: int) -> list[Instr]:
        return [i for i in self.ranks[rank] if i.is_compute]

    def format(self, rank: int | None = None, compute_only: bool = True) -> str:
        rows = range(self.pp) if rank is None else [rank]
        lines = []
        for r in rows:
            instrs = self.ranks[r] if not compute_only else self.compute(r)
            lines.append(f"rank {r}: " + " ".join(repr(i) for i in instrs))
        return "\n".join(lines)


def add_comms(
    name: str,
    pp: int,
    n_stages: int,
    microbatches: int,
    routes: Sequence[Sequence[int]],
    route_of: Sequence[int],
    compute: Sequence[Sequence[Instr]],
) -> Schedule:
    """Insert the sends and receives that the compute lists imply, and return the `Schedule`.

    Placement: the sends of a chunk's results come right after it. A receive comes right before
    the chunk that needs it, or earlier where needed so that, between each pair of ranks, tensors
    are received in the order they are sent (NCCL matches P2P operations by order): receives are
    posted in the sender's order, each at the latest position that is before every later
    message's consumer. Consecutive communication instructions form one batch (one
    `batch_isend_irecv`), so a chunk's sends travel with the next chunk's receives, as in
    DualPipe's reference. `check_blocking_comms` (simulator.py) proves, per schedule, that this
    cannot deadlock even if every operation of a batch had to meet its partner before the rank
    went on.
    """
    routes = tuple(tuple(r) for r in routes)
    route_of = tuple(route_of)
    sched = Schedule(name, pp, n_stages, microbatches, routes, route_of)
    last = n_stages - 1
    sends: list[list[list[Instr]]] = []                  # rank -> compute index -> sends after it
    needs: list[dict[int, list[tuple[int, Instr]]]] = []  # rank -> peer -> (consumer index, recv)
    for rank, instrs in enumerate(compute):
        sends.append([[] for _ in instrs])
        needs.append(defaultdict(list))
        for idx, ins in enumerate(instrs):
            for part in ins.parts():
                s, m = part.stage, part.mb
                route = sched.route(m)
                if route[s] != rank:
                    raise ValueError(f"{name}: rank {rank} was given {part!r} but stage {s} of "
                                     f"micro-batch {m} runs on rank {route[s]}")
                fwd, bwd = part.op is Op.F, part.op in (Op.B, Op.I)
                if fwd and s > 0 and (src := route[s - 1]) != rank:
                    needs[rank][src].append((idx, Instr(Op.RECV_ACT, s - 1, m, src)))
                if bwd and s < last and (src := route[s + 1]) != rank:
                    needs[rank][src].append((idx, Instr(Op.RECV_GRAD, s + 1, m, src)))
                if fwd and s < last and route[s + 1] != rank:
                    sends[rank][idx].append(Instr(Op.SEND_ACT, s, m, peer=route[s + 1]))
                if bwd and s > 0 and route[s - 1] != rank:
                    sends[rank][idx].append(Instr(Op.SEND_GRAD, s, m, peer=route[s - 1]))
    send_order = {}  # (src, message) -> position in the sender's order
    for rank in range(pp):
        for idx, batch in enumerate(sends[rank]):
            for j, ins in enumerate(batch):
                send_order[(rank, ins.message())] = (idx, j)
    for rank, instrs in enumerate(compute):
        # anchor[k]: just after the last chunk before k that sends, so that the receives of k
        # travel in the batch of that chunk's sends (a W in between does not split them)
        anchor, last_sender = [], 0
        for idx in range(len(instrs)):
            anchor.append(last_sender)
            if sends[rank][idx]:
                last_sender = idx + 1
        recvs_at: list[list[tuple]] = [[] for _ in range(len(instrs) + 1)]
        for peer, wanted in needs[rank].items():
            wanted.sort(key=lambda w: send_order[(peer, w[1].message())])
            place = len(instrs)
            for consumer, ins in reversed(wanted):       # suffix minimum keeps the sender's order
                place = min(place, anchor[consumer])
                recvs_at[place].append((send_order[(peer, ins.message())], ins))
        out: list[Instr] = []
        for idx, ins in enumerate(instrs):
            # recvs_at[idx] are posted before chunk idx, i.e. after chunk idx-1 and its sends
            out.extend(i for _, i in sorted(recvs_at[idx], key=lambda x: (x[1].peer, x[0])))
            out.append(ins)
            out.extend(sends[rank][idx])
        sched.ranks.append(out)
    return sched


def comm_batches(instrs: Iterable[Instr]) -> list[list[Instr] | Instr]:
    """Group a rank's list into compute instructions and batches of consecutive comm ops."""
    out: list[list[Instr] | Instr] = []
    batch: list[Instr] = []
    for ins in instrs:
        if ins.is_comm:
            batch.append(ins)
            continue
        if batch:
            out.append(batch)
            batch = []
        out.append(ins)
    if batch:
        out.append(batch)
    return out


def message_tag(sched: Schedule, ins: Instr) -> int:
    """A unique P2P tag per message, so gloo matches by identity and not only by order."""
    kind, stage, mb = ins.message()
    return (mb * sched.n_stages + stage) * 2 + (kind == "grad")


class ScheduleError(ValueError):
    """A schedule that is not a valid order (see `validate_schedule`)."""


def validate_schedule(sched: Schedule) -> None:
    """Check the structural rules every schedule must obey; raise `ScheduleError` naming the first
    broken one.

    - every (stage, mb) gets exactly one F and either one B or one I followed by one W, all on the
      rank the route says;
    - on that rank, the backward comes after the forward, and W after I;
    - every message is sent once and received once, by the right ranks, and between each ordered
      pair of ranks the messages are received in the order they are sent (NCCL matches P2P by
      order, not by tag);
    - a receive for a chunk precedes it, a send follows the chunk that produced it.
    """
    seen: dict[tuple[Op, int, int], tuple[int, int]] = {}
    for rank, instrs in enumerate(sched.ranks):
        for pos, ins in enumerate(instrs):
            for part in ins.parts() if ins.is_compute else ():
                key = (part.op, part.stage, part.mb)
                if not (0 <= part.stage < sched.n_stages and 0 <= part.mb < sched.microbatches):
                    raise ScheduleError(f"{sched.name}: {part!r} is out of range "
                                        f"(S={sched.n_stages}, m={sched.microbatches})")
                if sched.rank_of(part.stage, part.mb) != rank:
                    raise ScheduleError(f"{sched.name}: {part!r} on rank {rank}, its route says "
                                        f"rank {sched.rank_of(part.stage, part.mb)}")
                if key in seen:
                    raise ScheduleError(f"{sched.name}: {part!r} appears twice "
                                        f"(on rank {rank})")
                seen[key] = (rank, pos)
    for s in range(sched.n_stages):
        for m in range(sched.microbatches):
            f = seen.get((Op.F, s, m))
            b, i, w = (seen.get((op, s, m)) for op in (Op.B, Op.I, Op.W))
            if f is None:
                raise ScheduleError(f"{sched.name}: no forward of stage {s}, micro-batch {m}")
            if (b is None) == (i is None) or (i is None) != (w is None):
                raise ScheduleError(f"{sched.name}: stage {s}, micro-batch {m} needs one B or one "
                                    f"I+W; found B={b is not None} I={i is not None} "
                                    f"W={w is not None}")
            first_bwd = b or i
            if first_bwd[1] <= f[1]:
                raise ScheduleError(f"{sched.name}: backward of stage {s}, micro-batch {m} comes "
                                    f"before (or with) its forward on rank {f[0]}")
            if w is not None and w[1] <= i[1]:
                raise ScheduleError(f"{sched.name}: W of stage {s}, micro-batch {m} precedes its I")
    _validate_messages(sched, seen)


def _validate_messages(sched: Schedule, seen: dict) -> None:
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    where: dict[tuple, int] = {}
    for rank, instrs in enumerate(sched.ranks):
        for pos, ins in enumerate(instrs):
            if not ins.is_comm:
                continue
            msg = ins.message()
            if ins.op in (Op.SEND_ACT, Op.SEND_GRAD):
                sends[(rank, ins.peer)].append(msg)
                where[("send", msg)] = pos
            else:
                recvs[(ins.peer, rank)].append(msg)
                where[("recv", msg)] = pos
    for pair_ in set(sends) | set(recvs):
        if sends[pair_] != recvs[pair_]:
            raise ScheduleError(f"{sched.name}: messages rank {pair_[0]} -> rank {pair_[1]} are "
                                f"sent as {sends[pair_][:8]}... but received as "
                                f"{recvs[pair_][:8]}...; they must match in order")
    # every cross-rank edge of the dataflow has its message, placed around the right chunks
    for (op, s, m), (rank, pos) in seen.items():
        route = sched.route(m)
        if op is Op.F and s > 0 and route[s - 1] != rank:
            _check_around(sched, ("recv", ("act", s - 1, m)), where, pos, before=True)
            _check_around(sched, ("send", ("act", s - 1, m)), where,
                          seen[(Op.F, s - 1, m)][1], before=False)
        if op in (Op.B, Op.I) and s > 0 and route[s - 1] != rank:
            _check_around(sched, ("send", ("grad", s, m)), where, pos, before=False)
            consumer = seen.get((Op.B, s - 1, m)) or seen[(Op.I, s - 1, m)]
            _check_around(sched, ("recv", ("grad", s, m)), where, consumer[1], before=True)


def _check_around(sched: Schedule, key: tuple, where: dict, pos: int, before: bool) -> None:
    if key not in where:
        raise ScheduleError(f"{sched.name}: missing {key[0]} of {key[1]}")
    ok = where[key] < pos if before else where[key] > pos
    if not ok:
        raise ScheduleError(f"{sched.name}: {key[0]} of {key[1]} is on the wrong side of the "
                            f"chunk that {'needs' if before else 'produces'} it")

