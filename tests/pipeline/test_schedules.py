"""Every generated schedule is a valid order and cannot deadlock, even with blocking P2P."""
import dataclasses
import types

import pytest
import torch

from dsv3.parallel.pipeline import (SCHEDULES, Instr, Op, ScheduleError, build_schedule,
                                    check_blocking_comms, simulate, validate_schedule)
from dsv3.parallel.pipeline.config import SCHEDULE_NAMES

CASES = [(name, pp, m) for name in SCHEDULES for pp in (1, 2, 3, 4, 6, 8, 16)
         for m in (2 * pp, 3 * pp + 1)
         if not (name == "dualpipe" and (pp % 2 or m % 2))]


@pytest.mark.parametrize("name,pp,m", CASES, ids=[f"{n}-pp{p}-m{m}" for n, p, m in CASES])
def test_schedule_is_valid_and_deadlock_free(name, pp, m):
    sched = build_schedule(name, pp, m)
    validate_schedule(sched)         # F before B, I before W, messages matched in order
    check_blocking_comms(sched)      # no deadlock even if every P2P batch must complete at once
    simulate(sched)                  # no deadlock with async sends either


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
@pytest.mark.parametrize("pp,m", [(4, 1), (4, 3), (8, 5)])
def test_fewer_microbatches_than_ranks_still_valid(name, pp, m):
    sched = build_schedule(name, pp, m)
    validate_schedule(sched)
    check_blocking_comms(sched)


def test_stage_placement():
    pp = 4
    assert [build_schedule("1f1b", pp, 8).stages_on_rank(r) for r in range(pp)] == [[0], [1], [2], [3]]
    dual = build_schedule("dualpipe", pp, 8)
    assert [dual.stages_on_rank(r) for r in range(pp)] == [[0, 3], [1, 2], [1, 2], [0, 3]]
    assert dual.ranks_holding(1) == [1, 2]
    # half the micro-batches enter at each end
    assert dual.route(0) == (0, 1, 2, 3) and dual.route(7) == (3, 2, 1, 0)
    v = build_schedule("dualpipev", pp, 8)
    assert [v.stages_on_rank(r) for r in range(pp)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert v.route(0) == (0, 1, 2, 3, 3, 2, 1, 0)


def test_dualpipe_rank0_begins_like_the_reference_figure():
    # deepseek-ai/DualPipe README figure (pp=8, 20 micro-batches): device 0 runs forwards 0..6
    # of its own direction, then the first chunk arriving from the other end
    sched = build_schedule("dualpipe", 8, 20)
    first = sched.compute(0)[:8]
    assert [(i.op, i.mb) for i in first[:7]] == [(Op.F, mb) for mb in range(7)]
    assert first[7].op is Op.F and first[7].mb == 10 and first[7].stage == 7
    # the last thing every rank does is deferred weight gradients
    for r in range(8):
        assert sched.compute(r)[-1].op is Op.W


def test_dualpipev_matches_torch_port():
    """torch.distributed.pipelining ports the same reference; our compute order must agree."""
    from torch.distributed.pipelining import schedules as ts
    if not hasattr(ts, "ScheduleDualPipeV"):
        pytest.skip(f"torch {torch.__version__} has no ScheduleDualPipeV to compare with")
    kinds = {ts.FORWARD: Op.F, ts.FULL_BACKWARD: Op.B, ts.BACKWARD_INPUT: Op.I,
             ts.BACKWARD_WEIGHT: Op.W}
    for pp, m in [(2, 4), (4, 10), (4, 13)]:
        ours = build_schedule("dualpipev", pp, m)
        fake = types.SimpleNamespace(pp_group_size=pp, _n_microbatches=m)
        for r in range(pp):
            theirs = []
            for a in ts.ScheduleDualPipeV._calculate_single_rank_operations(fake, r):
                subs = a.sub_actions if a.computation_type == ts.OVERLAP_F_B else (a,)
                theirs.append(tuple((kinds[s.computation_type], s.stage_index, s.microbatch_index)
                                    for s in subs))
            mine = [tuple((p.op, p.stage, p.mb) for p in i.parts()) for i in ours.compute(r)]
            assert mine == theirs, f"pp={pp} m={m} rank {r}"


def _mutate(sched, rank, fn):
    new = dataclasses.replace(sched, ranks=[list(x) for x in sched.ranks])
    new.ranks[rank] = fn(new.ranks[rank])
    return new


def test_validation_catches_broken_orders():
    sched = build_schedule("zb1p", 4, 8)
    validate_schedule(sched)

    def swap_first_f_and_i(instrs):
        i = next(k for k, x in enumerate(instrs) if x.op is Op.I)
        f = next(k for k, x in enumerate(instrs) if x.op is Op.F and x.mb == instrs[i].mb)
        instrs[i], instrs[f] = instrs[f], instrs[i]
        return instrs

    with pytest.raises(ScheduleError, match="before"):
        validate_schedule(_mutate(sched, 2, swap_first_f_and_i))

    def w_before_i(instrs):
        w = next(k for k, x in enumerate(instrs) if x.op is Op.W)
        i = next(k for k, x in enumerate(instrs) if x.op is Op.I and x.mb == instrs[w].mb)
        instrs.insert(i, instrs.pop(w))
        return instrs

    with pytest.raises(ScheduleError, match="W of stage 1, micro-batch 0 precedes its I"):
        validate_schedule(_mutate(sched, 1, w_before_i))

    def drop_a_receive(instrs):
        k = next(k for k, x in enumerate(instrs) if x.op is Op.RECV_ACT)
        return instrs[:k] + instrs[k + 1:]

    with pytest.raises(ScheduleError, match="rank 0 -> rank 1"):
        validate_schedule(_mutate(sched, 1, drop_a_receive))

    def swap_two_sends(instrs):
        a, b = [k for k, x in enumerate(instrs) if x.op is Op.SEND_ACT][:2]
        instrs[a], instrs[b] = instrs[b], instrs[a]
        return instrs

    with pytest.raises(ScheduleError, match="must match in order"):
        validate_schedule(_mutate(sched, 0, swap_two_sends))

    def duplicate_w(instrs):
        return instrs + [next(x for x in instrs if x.op is Op.W)]

    with pytest.raises(ScheduleError, match="appears twice"):
        validate_schedule(_mutate(sched, 3, duplicate_w))

    def wrong_rank(instrs):
        return instrs + [Instr(Op.F, 0, 0)]

    with pytest.raises(ScheduleError, match="route says rank 0"):
        validate_schedule(_mutate(sched, 3, wrong_rank))


def test_generators_reject_impossible_sizes():
    with pytest.raises(ValueError, match="even pp"):
        build_schedule("dualpipe", 3, 12)
    with pytest.raises(ValueError, match="microbatches=6"):
        build_schedule("dualpipe", 4, 6)
    with pytest.raises(ValueError, match="at least 2\\*pp"):
        build_schedule("dualpipev", 4, 7)
    with pytest.raises(ValueError, match="'gpipe' is not a known schedule"):
        build_schedule("gpipe", 4, 8)
    assert set(SCHEDULE_NAMES) == set(SCHEDULES)
