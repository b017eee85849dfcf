"""Generators of the schedules: 1F1B, ZB1P, DualPipe, DualPipeV, and Seq1F1B (1F1B over sequence segments).

Each returns a `Schedule` (schedule.py). Only the order of compute chunks is decided here; the
sends and receives follow from it (`add_comms`). The DualPipe/DualPipeV orders follow the step
structure of deepseek-ai/DualPipe (steps 1-8 below); ZB1P is the handcrafted ZB-H1 schedule of
"Zero Bubble Pipeline Parallelism" (Qi et al., 2024, §2.1).
"""
from __future__ import annotations

from collections import deque

from .schedule import Instr, Op, Schedule, add_comms, pair


def one_f_one_b(pp: int, microbatches: int) -> Schedule:
    """1F1B: rank r = stage r; pp-1-r warm-up forwards, then alternate F and full B."""
    _require(pp >= 1 and microbatches >= 1, "1f1b", pp, microbatches)
    compute = []
    for r in range(pp):
        warmup = min(pp - 1 - r, microbatches)
        order = [Instr(Op.F, r, m) for m in range(warmup)]
        for k in range(microbatches - warmup):
            order += [Instr(Op.F, r, warmup + k), Instr(Op.B, r, k)]
        order += [Instr(Op.B, r, m) for m in range(microbatches - warmup, microbatches)]
        compute.append(order)
    return add_comms("1f1b", pp, pp, microbatches, [tuple(range(pp))], [0] * microbatches, compute)


def seq1f1b(pp: int, microbatches: int, seq_chunks: int = 1) -> Schedule:
    """Seq1F1B (Zhang et al. 2024, arXiv 2406.03488): 1F1B over sequence segments.

    `microbatches` counts segments: micro-batch u is segment u % N of sequence u // N (N =
    `seq_chunks`). Forwards run in that order; backwards run each sequence's segments in reverse,
    because a segment's keys and values are read by the later segments of its sequence, whose
    backward must have delivered their gradient first. So that the last rank has run a sequence's
    last segment before its backward starts, every rank warms up with N-1 more forwards than 1F1B:
    pp-1-r+N-1. Peak alive on rank 0: pp+N-1 segments, (pp+N-1)/N sequences, against 1F1B's pp.
    """
    _require(pp >= 1 and microbatches >= 1, "seq1f1b", pp, microbatches)
    if seq_chunks < 1 or microbatches % seq_chunks:
        raise ValueError(f"seq1f1b: {microbatches} micro-batches are not whole sequences of "
                         f"seq_chunks={seq_chunks} segments")
    n = seq_chunks
    backward_order = [s * n + (n - 1 - i) for s in range(microbatches // n) for i in range(n)]
    compute = []
    for r in range(pp):
        warmup = min(pp - 1 - r + n - 1, microbatches)
        order = [Instr(Op.F, r, u) for u in range(warmup)]
        for k in range(microbatches - warmup):
            order += [Instr(Op.F, r, warmup + k), Instr(Op.B, r, backward_order[k])]
        order += [Instr(Op.B, r, u) for u in backward_order[microbatches - warmup:]]
        compute.append(order)
    return add_comms("seq1f1b", pp, pp, microbatches, [tuple(range(pp))], [0] * microbatches, compute)


def zb1p(pp: int, microbatches: int) -> Schedule:
    """ZB1P (ZB-H1): 1F1B's order of F and input-backward I, with each W deferred.

    Rank r runs W of micro-batch k right after the I of micro-batch k+r (then the rest at the end):
    its (pp-1-r) warm-up forwards plus r deferred W's keep every rank at pp micro-batches whose
    activations are alive (F done, W not yet), 1F1B's peak on rank 0. The I chain back to rank 0
    no longer waits for W, and the deferred W's fill the drain at the end: the bubble drops from
    (pp-1)(F+B) to (pp-1)(F+B-2W) (Table 2, with B the full backward).
    """
    _require(pp >= 1 and microbatches >= 1, "zb1p", pp, microbatches)
    compute = []
    for r in range(pp):
        warmup = min(pp - 1 - r, microbatches)
        order = [Instr(Op.F, r, m) for m in range(warmup)]
        pending: deque[int] = deque()

        def backward(k: int) -> list[Instr]:
            pending.append(k)
            out = [Instr(Op.I, r, k)]
            if len(pending) > r:
                out.append(Instr(Op.W, r, pending.popleft()))
            return out

        for k in range(microbatches - warmup):
            order += [Instr(Op.F, r, warmup + k)] + backward(k)
        for k in range(microbatches - warmup, microbatches):
            order += backward(k)
        order += [Instr(Op.W, r, k) for k in pending]
        compute.append(order)
    return add_comms("zb1p", pp, pp, microbatches, [tuple(range(pp))], [0] * microbatches, compute)


class _DualBuilder:
    """One rank's list for DualPipe/DualPipeV, written with the reference's step functions.

    A rank holds two chunks: phase 0 is the one nearer to where its micro-batches enter, phase 1
    the other. Micro-batches of a phase are taken FIFO, and so are its sends and receives, each
    with its own counter as in the reference. W's are queued FIFO across phases (DualPipe's
    WeightGradStore) and popped by `weight()`. Communication goes exactly where the reference
    puts it: some receives are posted one chunk early and some sends deferred by one chunk,
    which is what keeps the bidirectional exchange free of deadlocks under blocking P2P.
    """

    def __init__(self, rank: int, stage: tuple[int, int], mbs: tuple[list[int], list[int]],
                 route, n_stages: int):
        self.rank, self.stage, self.mbs, self.route = rank, stage, mbs, route
        self.last = n_stages - 1
        self.count = {k: [0, 0] for k in ("f", "b", "send_f", "send_b", "recv_f", "recv_b")}
        self.w_queue: deque[Instr] = deque()
        self.order: list[Instr] = []

    def _next(self, counter: str, phase: int) -> tuple[int, int]:
        m = self.mbs[phase][self.count[counter][phase]]
        self.count[counter][phase] += 1
        return self.stage[phase], m

    def _remote(self, stage: int, mb: int, step: int) -> int | None:
        """Rank of the neighbour stage (step = -1 before, +1 after), None if none or local."""
        nb = stage + step
        if not 0 <= nb <= self.last or self.route(mb)[nb] == self.rank:
            return None
        return self.route(mb)[nb]

    # communication (the reference's _recv_forward/_send_forward/_recv_backward/_send_backward)
    def recv_forward(self, phase: int) -> None:
        s, m = self.stage[phase], self.mbs[phase][self.count["recv_f"][phase]]
        if (peer := self._remote(s, m, -1)) is not None:
            self.count["recv_f"][phase] += 1
            self.order.append(Instr(Op.RECV_ACT, s - 1, m, peer))

    def send_forward(self, phase: int) -> None:
        s, m = self.stage[phase], self.mbs[phase][self.count["send_f"][phase]]
        if (peer := self._remote(s, m, +1)) is not None:
            self.count["send_f"][phase] += 1
            self.order.append(Instr(Op.SEND_ACT, s, m, peer))

    def recv_backward(self, phase: int) -> None:
        s, m = self.stage[phase], self.mbs[phase][self.count["recv_b"][phase]]
        if (peer := self._remote(s, m, +1)) is not None:
            self.count["recv_b"][phase] += 1
            self.order.append(Instr(Op.RECV_GRAD, s + 1, m, peer))

    def send_backward(self, phase: int) -> None:
        s, m = self.stage[phase], self.mbs[phase][self.count["send_b"][phase]]
        if (peer := self._remote(s, m, -1)) is not None:
            self.count["send_b"][phase] += 1
            self.order.append(Instr(Op.SEND_GRAD, s, m, peer))

    # compute
    def _f(self, phase: int) -> Instr:
        return Instr(Op.F, *self._next("f", phase))

    def _b(self, phase: int, split: bool) -> Instr:
        s, m = self._next("b", phase)
        if split:
            self.w_queue.append(Instr(Op.W, s, m))
            return Instr(Op.I, s, m)
        return Instr(Op.B, s, m)

    def forward(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_forward(phase)
        self.order.append(self._f(phase))
        if send:
            self.send_forward(phase)

    def backward(self, phase: int, split: bool = False, recv: bool = True, send: bool = True):
        if recv:
            self.recv_backward(phase)
        self.order.append(self._b(phase, split))
        if send:
            self.send_backward(phase)

    def forward_backward(self, f_phase: int, b_phase: int, recv_f: bool = True) -> None:
        if recv_f:
            self.recv_forward(f_phase)
        self.recv_backward(b_phase)
        self.order.append(pair(self._f(f_phase), self._b(b_phase, split=False)))
        self.send_forward(f_phase)
        self.send_backward(b_phase)

    def weight(self) -> None:
        self.order.append(self.w_queue.popleft())

    def done(self) -> list[Instr]:
        assert not self.w_queue, f"W's left in the queue: {self.w_queue}"
        return self.order


def _dual_steps(b: _DualBuilder, n: int, h: int, chunks: int, middle: bool) -> list[Instr]:
    """DualPipe's eight steps for a rank at distance h from its end of a pipe of n ranks (DualPipe:
    n = pp/2 half-pipe; DualPipeV: n = pp) with `chunks` micro-batches entering at each end.

    `middle` marks the rank(s) where the two phases meet (DualPipe's two middle ranks, DualPipeV's
    last rank): they send a phase-0 output at once, and their first step-4 pair is not
    overlapped, which the reference does to shrink the bubble.
    """
    for _ in range((n - h - 1) * 2):                      # 1: nF0
        b.forward(0)
    b.recv_forward(0)                                      # 2: nF0F1
    for i in range(h + 1):
        b.forward(0, recv=False, send=middle)
        b.recv_forward(0)
        b.forward(1, send=not middle or i < h)
        if not middle:
            b.send_forward(0)
    for _ in range(n - h - 1):                             # 3: nI1W1F1 (zero bubble)
        b.backward(1, split=True)
        b.recv_forward(1)
        b.weight()
        b.forward(1, recv=False)
    for i in range(chunks - 2 * n + h + 1):                # 4: nF0B1F1B0 (main)
        if i == 0 and middle:
            b.forward(0, recv=False, send=False)
            b.send_forward(1)
            b.backward(1, send=False)
            b.send_forward(0)
            b.send_backward(1)
        else:
            b.forward_backward(0, 1, recv_f=i > 0)
        b.forward_backward(1, 0)
    for _ in range(n - h - 1):                             # 5: nB1F1B0
        b.backward(1)
        b.forward_backward(1, 0)
    split = False                                          # 6: nB1B0, 2nd half zero bubble
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        b.backward(1, split)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        b.backward(0, split)
    for _ in range(n - h - 1):                             # 7: nWB0 (zero bubble)
        b.weight()
        b.backward(0, split=True)
    for _ in range(h + 1):                                 # 8: nW
        b.weight()
    return b.done()


def dualpipe(pp: int, microbatches: int) -> Schedule:
    """DualPipe: pp stages, each held twice; rank r holds stages r and pp-1-r.

    Micro-batches 0..m/2-1 enter at rank 0 and run stages 0..pp-1 on ranks 0..pp-1; micro-batches
    m/2..m-1 enter at rank pp-1 and run stages 0..pp-1 on ranks pp-1..0. The gradients of the two
    copies of a stage must be summed after the step (`PipelineExecutor.reduce_mirrored_grads`).
    Needs an even pp and an even m >= 2*pp (the reference's own asserts).
    """
    if pp < 2 or pp % 2 or microbatches < 2 * pp or microbatches % 2:
        raise ValueError(f"dualpipe needs an even pp >= 2 and an even number of micro-batches "
                         f">= 2*pp; got pp={pp}, microbatches={microbatches}")
    half = microbatches // 2
    down, up = list(range(half)), list(range(half, microbatches))
    sched = Schedule("dualpipe", pp, pp, microbatches,
                     routes=(tuple(range(pp)), tuple(range(pp - 1, -1, -1))),
                     route_of=(0,) * half + (1,) * half)
    for r in range(pp):
        h = min(r, pp - 1 - r)
        # phase 0 runs the stream entering at this rank's end, phase 1 the other
        mbs = (down, up) if r < pp // 2 else (up, down)
        b = _DualBuilder(r, (h, pp - 1 - h), mbs, sched.route, pp)
        sched.ranks.append(_dual_steps(b, pp // 2, h, half, middle=r in (pp // 2 - 1, pp // 2)))
    return sched


def dualpipev(pp: int, microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half"): 2*pp stages on pp ranks, rank r holds stages r and 2pp-1-r.

    Every micro-batch goes down ranks 0..pp-1 (stages 0..pp-1), turns on rank pp-1 (stage pp is
    local there) and comes back up to rank 0, which therefore holds both the first and the last
    stage (embedding and head + MTP on one rank, as the V3 report wants for sharing them).
    Needs m >= 2*pp.
    """
    if pp < 1 or microbatches < 2 * pp:
        raise ValueError(f"dualpipev needs pp >= 1 and at least 2*pp micro-batches; got pp={pp}, "
                         f"microbatches={microbatches}")
    mbs = list(range(microbatches))
    sched = Schedule("dualpipev", pp, 2 * pp, microbatches,
                     routes=(tuple(range(pp)) + tuple(range(pp - 1, -1, -1)),),
                     route_of=(0,) * microbatches)
    for r in range(pp):
        b = _DualBuilder(r, (r, 2 * pp - 1 - r), (mbs, mbs), sched.route, 2 * pp)
        sched.ranks.append(_dual_steps(b, pp, r, microbatches, middle=r == pp - 1))
    return sched


SCHEDULES = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev,
             "seq1f1b": seq1f1b}


def build_schedule(name: str, pp: int, microbatches: int, seq_chunks: int = 1) -> Schedule:
    """The schedule called `name` (config key ``parallel.pp_schedule``) for pp ranks; for seq1f1b,
    `microbatches` counts segments, `seq_chunks` per sequence."""
    if name not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={name!r} is not a known schedule; "
                         f"choose one of {sorted(SCHEDULES)}")
    if name == "seq1f1b":
        return seq1f1b(pp, microbatches, seq_chunks)
    return SCHEDULES[name](pp, microbatches)


def _require(ok: bool, name: str, pp: int, microbatches: int) -> None:
    if not ok:
        raise ValueError(f"{name} needs pp >= 1 and microbatches >= 1; got pp={pp}, "
                         f"microbatches={microbatches}")
