"""Simulate a `Schedule`: timeline, idle time and bubble per rank, peak memory per rank.

Cost model:
- every chunk of every stage costs the same: F forward, B full backward, W weight backward,
  I = B - W input backward, and an overlapped F&B pair costs `FB` (F&B <= F + B when the
  overlap hides communication);
- a rank runs its instructions in list order, one at a time; a chunk starts when the rank is free
  and its inputs have arrived; a tensor sent to another rank arrives `p2p` after the chunk that
  produced it ends; sends never block ("async" semantics).

Bubble: a rank's idle time inside the step, i.e. makespan minus the sum of its instruction costs,
where the makespan runs from the first instruction's start on any rank to the last one's end.
`SimResult.bubble` is the largest of them. With p2p = 0 this reproduces the V3 report's Table 2
exactly (PP = number of stages; tests/pipeline/test_simulator.py checks every case):
- 1F1B: (PP-1)(F+B), for any F, B and any m; every rank idles the same.
- ZB1P: (PP-1)(F+B-2W) when W <= F and W <= I, m >= PP; every rank idles the same. For any
  costs it is (PP-1) max(F, I, F+I-W).
- DualPipe: (PP/2-1)(F&B+B-3W) when I = F (the input backward takes as long as the forward),
  W <= F, B <= F&B <= F+B, m >= 2 PP. This is the idle time of the two middle ranks; a rank h
  steps from its end with h < PP/2-2 runs PP/2-2-h fewer overlapped pairs (those chunks run
  alone), so it works that many (F+B-F&B) longer and idles that much less.
- DualPipeV (2pp stages on pp ranks): the same formula with PP = 2pp, i.e. (pp-1)(F&B+B-3W), in
  units of its half-size chunks; the turning rank pp-1 idles most.

`check_blocking_comms` runs the same lists under the strictest semantics: each batch of
consecutive communication instructions is posted at once and the rank waits until every send
and receive in it has met its partner (rendezvous); it reports a deadlock if ranks wait on each
other in a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .schedule import Instr, Op, Schedule, comm_batches


@dataclass(frozen=True)
class Costs:
    """Time of one chunk of each kind (any unit). `FB` defaults to F + B (no overlap gain)."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None
    p2p: float = 0.0

    def __post_init__(self):
        if not (0 <= self.W <= self.B):
            raise ValueError(f"costs need 0 <= W <= B (W is part of the full backward B); "
                             f"got W={self.W}, B={self.B}")
        if self.FB is not None and self.FB < 0 or self.p2p < 0 or self.F < 0:
            raise ValueError(f"costs must be >= 0; got {self}")

    @property
    def I(self) -> float:  # noqa: E743
        return self.B - self.W

    @property
    def pair(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, ins: Instr) -> float:
        if ins.op is Op.FB:
            # a pair whose backward is input-only saves the W it does not run
            return self.pair - (self.W if ins.pair[1].op is Op.I else 0.0)
        return {Op.F: self.F, Op.B: self.B, Op.I: self.I, Op.W: self.W}.get(ins.op, 0.0)


@dataclass
class Block:
    """One executed compute instruction on the timeline."""

    rank: int
    instr: Instr
    start: float
    end: float


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    blocks: list[Block]
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_activations: list[float]
    peak_activations_until_w: list[float]
    param_chunks: list[int]
    extra: dict = field(default_factory=dict)

    @property
    def bubble(self) -> float:
        """The largest per-rank idle time: what Table 2 calls the bubble."""
        return max(self.idle)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the step, averaged over ranks."""
        return sum(self.idle) / (self.makespan * len(self.idle)) if self.makespan else 0.0


class Deadlock(RuntimeError):
    """No rank can make progress but some have instructions left."""


def simulate(sched: Schedule, costs: Costs = Costs()) -> SimResult:
    """Run `sched` under `costs` with async sends (see module docstring).

    `costs` may be any object with `of(instr) -> duration` and `p2p` (e.g. durations measured
    per stage by the executor, see benchmarks/pipeline_bubble.py).
    """
    arrival: dict[tuple[str, int, int], float] = {}   # (kind, producing stage, mb) -> ready time
    pos = [0] * sched.pp
    free = [0.0] * sched.pp
    blocks: list[Block] = []
    compute = [sched.compute(r) for r in range(sched.pp)]
    last = sched.n_stages - 1
    remaining = sum(map(len, compute))
    while remaining:
        progressed = False
        for r in range(sched.pp):
            while pos[r] < len(compute[r]):
                ins = compute[r][pos[r]]
                ready = _inputs_ready(sched, ins, r, arrival, costs, last)
                if ready is None:
                    break
                start = max(free[r], ready)
                end = start + costs.of(ins)
                for part in ins.parts():
                    if part.op is Op.F:
                        arrival[("act", part.stage, part.mb)] = end
                    elif part.op in (Op.B, Op.I):
                        arrival[("grad", part.stage, part.mb)] = end
                blocks.append(Block(r, ins, start, end))
                free[r] = end
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: compute[r][pos[r]] for r in range(sched.pp) if pos[r] < len(compute[r])}
            raise Deadlock(f"{sched.name}: no rank can proceed; waiting: {stuck}")
    start0 = min((b.start for b in blocks), default=0.0)
    makespan = max((b.end for b in blocks), default=0.0) - start0
    busy = [0.0] * sched.pp
    for b in blocks:
        busy[b.rank] += b.end - b.start
    idle = [makespan - x for x in busy]
    act, act_w = peak_activations(sched)
    chunks = [len(sched.stages_on_rank(r)) for r in range(sched.pp)]
    return SimResult(sched, costs, blocks, makespan, busy, idle, act, act_w, chunks)


def _inputs_ready(sched, ins, rank, arrival, costs, last) -> float | None:
    """Earliest time all inputs of `ins` are on `rank`, or None if some are not produced yet."""
    t = 0.0
    for part in ins.parts():
        s, m = part.stage, part.mb
        route = sched.route(m)
        if part.op is Op.F and s > 0:
            key, src = ("act", s - 1, m), route[s - 1]
        elif part.op in (Op.B, Op.I) and s < last:
            key, src = ("grad", s + 1, m), route[s + 1]
        else:
            continue  # first stage's forward, last stage's backward (from the loss), W
        if key not in arrival:
            return None
        t = max(t, arrival[key] + (costs.p2p if src != rank else 0.0))
    return t


def peak_activations(sched: Schedule, weight: Callable[[int, int], float] | None = None,
                     kept_after_i: Callable[[int, int], float] | None = None,
                     backward_extra: Callable[[int, int], float] | None = None) -> tuple[list[float], list[float]]:
    """Peak number of chunks per rank whose forward activations are alive, counted in program
    order: a chunk becomes alive when its forward starts and dies when its backward for inputs
    (B or I) ends; `until_w` keeps it alive until its W (the weight gradient still needs the saved
    layer inputs). In an FB pair the new forward's activations exist while the old backward runs,
    so the pair counts both (this is DualPipe's PP+1).

    `weight(stage, mb)`: what one chunk holds (e.g. its bytes, which differ between stages and,
    for Seq1F1B's segments, between micro-batches); the default counts chunks. `kept_after_i`: the
    part of it still held between its I and its W (default: all of it). `backward_extra`: what a
    chunk's backward (B or I) holds beyond the chunk while it runs (activation checkpointing's
    recomputation; default none), on top of everything alive when it starts.
    """
    weight = weight or (lambda stage, mb: 1)
    kept = kept_after_i or weight
    extra = backward_extra or (lambda stage, mb: 0)
    peaks, peaks_w = [], []
    for r in range(sched.pp):
        alive = alive_w = peak = peak_w = 0
        for ins in sched.compute(r):
            parts = ins.parts()
            born = sum(weight(p.stage, p.mb) for p in parts if p.op is Op.F)
            alive, alive_w = alive + born, alive_w + born
            bump = max((extra(p.stage, p.mb) for p in parts if p.op in (Op.B, Op.I)), default=0)
            peak, peak_w = max(peak, alive + bump), max(peak_w, alive_w + bump)
            for p in parts:
                if p.op in (Op.B, Op.I):
                    alive -= weight(p.stage, p.mb)
                if p.op is Op.B:
                    alive_w -= weight(p.stage, p.mb)
                elif p.op is Op.I:
                    alive_w -= weight(p.stage, p.mb) - kept(p.stage, p.mb)
                elif p.op is Op.W:
                    alive_w -= kept(p.stage, p.mb)
        peaks.append(peak)
        peaks_w.append(peak_w)
    return peaks, peaks_w


def check_blocking_comms(sched: Schedule, costs: Costs = Costs()) -> float:
    """Run `sched` with rendezvous communication; return the makespan or raise `Deadlock`.

    A batch (consecutive comm instructions, one `batch_isend_irecv`) is posted when the rank
    reaches it; it completes once the partner of each of its ops has posted the matching op, at
    max(both posting times) + p2p; only then does the rank go on. Matching is by message identity;
    `validate_schedule` separately checks that per rank pair the order agrees too.
    """
    items = [comm_batches(sched.ranks[r]) for r in range(sched.pp)]
    pos = [0] * sched.pp
    t = [0.0] * sched.pp
    posted: dict[tuple[str, tuple], float] = {}   # ("send"|"recv", message) -> posting time
    have: list[dict[tuple, float]] = [{} for _ in range(sched.pp)]  # tensors present on a rank
    n_left = sum(map(len, items))
    while n_left:
        progressed = False
        for r in range(sched.pp):
            while pos[r] < len(items[r]):
                item = items[r][pos[r]]
                if isinstance(item, Instr):       # compute: its inputs came with earlier batches
                    ready = _inputs_ready(sched, item, r, have[r], Costs(), sched.n_stages - 1)
                    if ready is None:
                        raise Deadlock(f"{sched.name}: rank {r} computes {item!r} before "
                                       f"receiving its input")
                    t[r] = max(t[r], ready) + costs.of(item)
                    for part in item.parts():
                        kind = "act" if part.op is Op.F else "grad"
                        if part.op is not Op.W:
                            have[r][(kind, part.stage, part.mb)] = t[r]
                else:
                    mine = [_side(i) for i in item]
                    for key in mine:
                        posted.setdefault(key, t[r])
                    partners = [_partner(key) for key in mine]
                    if any(p not in posted for p in partners):
                        break
                    done = max(max(posted[k], posted[p]) for k, p in zip(mine, partners))
                    t[r] = done + costs.p2p
                    for ins in item:
                        if ins.op in (Op.RECV_ACT, Op.RECV_GRAD):
                            have[r][ins.message()] = t[r]
                pos[r] += 1
                n_left -= 1
                progressed = True
        if not progressed:
            stuck = {r: items[r][pos[r]] for r in range(sched.pp) if pos[r] < len(items[r])}
            raise Deadlock(f"{sched.name}: blocking P2P deadlocks; waiting: {stuck}")
    return max(t)


def _side(ins: Instr) -> tuple[str, tuple]:
    return ("send" if ins.op in (Op.SEND_ACT, Op.SEND_GRAD) else "recv", ins.message())


def _partner(key: tuple[str, tuple]) -> tuple[str, tuple]:
    return ("recv" if key[0] == "send" else "send", key[1])
