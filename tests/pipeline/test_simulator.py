"""The simulator reproduces the DeepSeek-V3 report's Table 2 (bubble, parameters, activations).

Cost model under which Table 2 is exact (docs/pipeline.md derives the conditions; the tests
below also show the formulas stop holding outside them):
- 1F1B: any F, B, any m >= 1;
- ZB1P: W <= F and W <= B - W, m >= pp;
- DualPipe / DualPipeV: F = B - W (forward as long as the input backward), W <= F,
  B <= F&B <= F + B, m >= 2*pp (DualPipe: even m);
- all: zero P2P latency. Times are exact binary fractions, so equality is exact.
"""
import pytest

from dsv3.parallel.pipeline import (Costs, Deadlock, Instr, Op, Schedule, build_schedule,
                                    check_blocking_comms, simulate)


def table2_bubble(name: str, pp: int, c: Costs) -> float:
    """Table 2 with PP = number of stages: DualPipeV's 2*pp stages give (pp-1)(F&B+B-3W)."""
    F, B, W, FB = c.F, c.B, c.W, c.pair
    n_stages = 2 * pp if name == "dualpipev" else pp
    return {"1f1b": (pp - 1) * (F + B), "zb1p": (pp - 1) * (F + B - 2 * W),
            "dualpipe": (n_stages / 2 - 1) * (FB + B - 3 * W),
            "dualpipev": (n_stages / 2 - 1) * (FB + B - 3 * W)}[name]


# F:B:W = 1:2:1 is the usual FLOP ratio; the second set exercises W < F and a smaller overlap gain
COSTS = [Costs(F=1.0, B=2.0, W=1.0, FB=2.5), Costs(F=1.5, B=2.0, W=0.5, FB=3.25)]


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("m_per_pp", [2, 3, 4])
@pytest.mark.parametrize("costs", COSTS, ids=["FBW=1:2:1", "FBW=3:4:1"])
def test_bubble_matches_table2(name, pp, m_per_pp, costs):
    m = m_per_pp * pp + (2 if name == "dualpipe" and m_per_pp == 3 and pp % 4 else 0)
    res = simulate(build_schedule(name, pp, m), costs)
    assert res.bubble == table2_bubble(name, pp, costs)
    if name in ("1f1b", "zb1p"):
        # every rank does the same work, so every rank has the same bubble
        assert res.idle == [table2_bubble(name, pp, costs)] * pp
    else:
        # the bubble is the idle time of the ranks where the two directions meet (DualPipe's
        # middle ranks, DualPipeV's turning rank); a rank h steps from its end (h < n-2) runs
        # n-2-h fewer overlapped pairs, works F+B-F&B longer for each, and idles that much less
        n = pp // 2 if name == "dualpipe" else pp
        gain = costs.F + costs.B - costs.pair
        h = [min(r, pp - 1 - r) if name == "dualpipe" else r for r in range(pp)]
        assert res.idle == [res.bubble - max(0, n - 2 - hr) * gain for hr in h]


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_memory_matches_table2(pp):
    m = 3 * pp
    one_f_one_b = simulate(build_schedule("1f1b", pp, m))
    assert one_f_one_b.param_chunks == [1] * pp
    assert one_f_one_b.peak_activations == list(range(pp, 0, -1))      # PP on rank 0
    zb = simulate(build_schedule("zb1p", pp, m))
    assert zb.param_chunks == [1] * pp
    # ZB-H1 defers W's only as far as keeps each rank at PP live chunks, 1F1B's peak
    assert zb.peak_activations_until_w == [pp] * pp
    dual = simulate(build_schedule("dualpipe", pp, m))
    assert dual.param_chunks == [2] * pp                                   # 2x parameters
    assert dual.peak_activations_until_w == [pp + 1] * pp                 # PP+1 activations
    # DualPipeV: 2*pp half-size stages; per device 2 of them (2x a stage) and 2pp+1 half chunks
    v = simulate(build_schedule("dualpipev", pp, m))
    assert v.param_chunks == [2] * pp
    assert v.peak_activations_until_w == [2 * pp + 1] * pp


def test_formulas_need_their_cost_conditions():
    # ZB1P with W > F: a deferred W no longer fits in the gap left by a forward
    c = Costs(F=0.5, B=2.0, W=1.0)
    assert simulate(build_schedule("zb1p", 4, 12), c).bubble == 3 * 1.0 > table2_bubble("zb1p", 4, c)
    # DualPipe with F != B - W: the formula no longer gives the bubble
    c = Costs(F=1.0, B=3.0, W=1.0, FB=3.5)
    assert simulate(build_schedule("dualpipe", 8, 24), c).bubble != table2_bubble("dualpipe", 8, c)
    # ZB1P with fewer micro-batches than ranks never reaches the steady state
    c = Costs(F=1.0, B=2.0, W=0.5)
    assert simulate(build_schedule("zb1p", 8, 4), c).bubble > table2_bubble("zb1p", 8, c)


@pytest.mark.parametrize("F", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("B", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("w_frac", [0.0, 0.25, 0.5, 0.75])
def test_zb1p_bubble_for_any_costs(F, B, w_frac):
    # beyond Table 2's regime (W <= F, W <= I): (pp-1) max(F, I, F+I-W), with I = B - W
    c = Costs(F=F, B=B, W=w_frac * B)
    for pp, m in [(4, 4), (4, 9), (8, 16)]:
        assert simulate(build_schedule("zb1p", pp, m), c).bubble == (pp - 1) * max(F, c.I, F + c.I - c.W)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_p2p_latency_only_adds_bubble(name):
    base = Costs(F=1.0, B=2.0, W=1.0, FB=2.5)
    slow = Costs(F=1.0, B=2.0, W=1.0, FB=2.5, p2p=0.25)
    sched = build_schedule(name, 4, 12)
    assert simulate(sched, slow).bubble > simulate(sched, base).bubble
    # the blocking semantics can only be slower than async sends
    assert check_blocking_comms(sched, slow) >= simulate(sched, slow).makespan


def test_timeline_respects_dependencies_and_rank_exclusivity():
    res = simulate(build_schedule("dualpipe", 4, 8), Costs(F=1, B=2, W=1, FB=2.5, p2p=0.5))
    by_rank = {}
    for b in res.blocks:
        by_rank.setdefault(b.rank, []).append(b)
    for blocks in by_rank.values():
        for a, b in zip(blocks, blocks[1:]):
            assert a.end <= b.start                     # one instruction at a time
    done = {}
    for b in res.blocks:
        for part in b.instr.parts():
            done[(part.op, part.stage, part.mb)] = (b.rank, b.start, b.end)
    for (op, s, m), (rank, start, _) in done.items():
        if op is Op.F and s > 0:
            src_rank, _, end = done[(Op.F, s - 1, m)]
            assert start >= end + (0.5 if src_rank != rank else 0)


def _two_rank_schedule(rank0, rank1, routes, route_of, m):
    return Schedule("handmade", 2, 2, m, routes, route_of, [rank0, rank1])


def test_cyclic_dependency_is_reported_as_deadlock():
    F, B = Op.F, Op.B
    # rank 0 waits for B0's gradient before F1; rank 1 needs F1's activation before B0
    r0 = [Instr(F, 0, 0), Instr(Op.SEND_ACT, 0, 0, 1), Instr(Op.RECV_GRAD, 1, 0, 1), Instr(B, 0, 0),
          Instr(F, 0, 1), Instr(Op.SEND_ACT, 0, 1, 1), Instr(Op.RECV_GRAD, 1, 1, 1), Instr(B, 0, 1)]
    r1 = [Instr(Op.RECV_ACT, 0, 0, 0), Instr(F, 1, 0), Instr(Op.RECV_ACT, 0, 1, 0), Instr(F, 1, 1),
          Instr(B, 1, 1), Instr(Op.SEND_GRAD, 1, 1, 0), Instr(B, 1, 0), Instr(Op.SEND_GRAD, 1, 0, 0)]
    sched = _two_rank_schedule(r0, r1, [(0, 1)], [0, 0], 2)
    with pytest.raises(Deadlock, match="no rank can proceed"):
        simulate(sched)


def test_send_send_cycle_deadlocks_only_with_blocking_p2p():
    # two micro-batches going opposite ways; each rank sends its own first, then does another
    # chunk before posting the receive: fine with async sends, a deadlock if sends block
    F, B = Op.F, Op.B
    r0 = [Instr(F, 0, 0), Instr(Op.SEND_ACT, 0, 0, 1), Instr(F, 0, 2), Instr(Op.SEND_ACT, 0, 2, 1),
          Instr(Op.RECV_ACT, 0, 1, 1), Instr(F, 1, 1), Instr(B, 1, 1), Instr(Op.SEND_GRAD, 1, 1, 1),
          Instr(Op.RECV_GRAD, 1, 0, 1), Instr(B, 0, 0), Instr(Op.RECV_GRAD, 1, 2, 1), Instr(B, 0, 2)]
    r1 = [Instr(F, 0, 1), Instr(Op.SEND_ACT, 0, 1, 0), Instr(F, 0, 3), Instr(Op.SEND_ACT, 0, 3, 0),
          Instr(Op.RECV_ACT, 0, 0, 0), Instr(F, 1, 0), Instr(B, 1, 0), Instr(Op.SEND_GRAD, 1, 0, 0),
          Instr(Op.RECV_GRAD, 1, 1, 0), Instr(B, 0, 1), Instr(Op.RECV_ACT, 0, 2, 0), Instr(F, 1, 2),
          Instr(B, 1, 2), Instr(Op.SEND_GRAD, 1, 2, 0)]
    r0 += [Instr(Op.RECV_ACT, 0, 3, 1), Instr(F, 1, 3), Instr(B, 1, 3), Instr(Op.SEND_GRAD, 1, 3, 1)]
    r1 += [Instr(Op.RECV_GRAD, 1, 3, 0), Instr(B, 0, 3)]
    sched = _two_rank_schedule(r0, r1, [(0, 1), (1, 0)], [0, 1, 0, 1], 4)
    simulate(sched)                                   # the dataflow itself is acyclic
    with pytest.raises(Deadlock, match="blocking P2P deadlocks"):
        check_blocking_comms(sched)


def test_costs_reject_w_larger_than_b():
    with pytest.raises(ValueError, match="W=3.0, B=2.0"):
        Costs(F=1.0, B=2.0, W=3.0)
