"""validate_pipeline names the key, the value and what is allowed; layers split evenly."""
import itertools

import pytest

from dsv3.config import ConfigError
from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline.config import validate_pipeline
from dsv3.parallel.pipeline.partition import (n_stages, partition_layers, rank_stages,
                                              stage_layers)


@pytest.mark.parametrize("pp,schedule,m,layers", [
    (1, "1f1b", 1, 1), (4, "1f1b", 3, 61), (16, "zb1p", 16, 61), (8, "dualpipe", 16, 61),
    (16, "dualpipe", 64, 61), (3, "dualpipev", 6, 6), (16, "dualpipev", 33, 61),
])
def test_valid_configs_pass(pp, schedule, m, layers):
    validate_pipeline(pp, schedule, m, layers)
    build_schedule(schedule, pp, m)          # and the generator accepts them too


@pytest.mark.parametrize("pp,schedule,m,layers,key,expected", [
    (4, "gpipe", 8, 61, "parallel.pp_schedule",
     r"parallel.pp_schedule='gpipe': must be one of 1f1b, zb1p, dualpipe, dualpipev"),
    (4, "DualPipe", 8, 61, "parallel.pp_schedule", r"parallel.pp_schedule='DualPipe': must be"),
    (0, "1f1b", 8, 61, "parallel.pp", r"parallel.pp=0: must be an integer >= 1"),
    (4, "1f1b", 0, 61, "parallel.microbatches", r"parallel.microbatches=0: must be an integer >= 1"),
    (3, "dualpipe", 12, 61, "parallel.pp", r"parallel.pp=3: .*dualpipe needs an even pp"),
    (4, "dualpipe", 6, 61, "parallel.microbatches",
     r"parallel.microbatches=6: .* needs an even number >= 2\*pp = 8"),
    (4, "dualpipe", 9, 61, "parallel.microbatches",
     r"parallel.microbatches=9: .* needs an even number >= 2\*pp = 8"),
    (4, "dualpipev", 7, 61, "parallel.microbatches",
     r"parallel.microbatches=7: parallel.pp_schedule=dualpipev .* needs >= 2\*pp = 8"),
    (32, "dualpipev", 64, 61, "parallel.pp",
     r"parallel.pp=32: .* makes 64 stages but the model has 61 layers.*allowed: pp <= 30"),
    (8, "1f1b", 8, 6, "parallel.pp", r"parallel.pp=8: .* makes 8 stages .* 6 layers.*pp <= 6"),
])
def test_invalid_configs_name_key_value_and_allowed(pp, schedule, m, layers, key, expected):
    with pytest.raises(ValueError, match=expected) as err:
        validate_pipeline(pp, schedule, m, layers)
    assert isinstance(err.value, ConfigError) and err.value.key == key


def brute_force_best(n_layers, stages, first, last):
    best = None
    for cuts in itertools.combinations(range(1, n_layers), stages - 1):
        sizes = [b - a for a, b in zip((0,) + cuts, cuts + (n_layers,))]
        costs = [s + (first if i == 0 else 0) + (last if i == stages - 1 else 0)
                 for i, s in enumerate(sizes)]
        best = max(costs) if best is None else min(best, max(costs))
    return best


@pytest.mark.parametrize("n_layers,stages,first,last", [
    (8, 4, 0, 0), (10, 4, 0, 0), (9, 4, 1.0, 1.5), (12, 3, 0.5, 3.0), (7, 7, 0, 0), (11, 5, 2, 0),
])
def test_partition_is_contiguous_and_minimizes_the_slowest_stage(n_layers, stages, first, last):
    ranges = partition_layers(n_layers, stages, first, last)
    assert len(ranges) == stages and all(len(r) >= 1 for r in ranges)
    assert [i for r in ranges for i in r] == list(range(n_layers))
    costs = [len(r) + (first if i == 0 else 0) + (last if i == stages - 1 else 0)
             for i, r in enumerate(ranges)]
    assert max(costs) == brute_force_best(n_layers, stages, first, last)


def test_partition_of_v3():
    # 61 layers on 16 stages: 13 stages of 4 and 3 of 3; with the head+MTP worth 2 layers the
    # last stage gets fewer layers and the first keeps its full share
    sizes = [len(r) for r in partition_layers(61, 16)]
    assert sorted(sizes) == [3] * 3 + [4] * 13
    sizes = [len(r) for r in partition_layers(61, 16, first_extra=0.5, last_extra=2.0)]
    assert sizes[-1] == 2 and sum(sizes) == 61 and max(sizes) == 4


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_rank_stages_agree_with_the_schedule(schedule):
    pp = 4
    sched = build_schedule(schedule, pp, 2 * pp)
    assert n_stages(schedule, pp) == sched.n_stages
    layout = stage_layers(schedule, pp, 16)
    for r in range(pp):
        assert rank_stages(schedule, pp, r) == sched.stages_on_rank(r)
        assert [s for s, _ in layout[r]] == sched.stages_on_rank(r)
    # every layer lives in exactly one stage
    per_stage = {s: rng for r in range(pp) for s, rng in layout[r]}
    assert sorted(i for rng in per_stage.values() for i in rng) == list(range(16))


def test_partition_errors():
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 non-empty stages"):
        partition_layers(3, 4)
    with pytest.raises(ValueError, match="must be >= 0"):
        partition_layers(8, 2, first_extra=-1)
    with pytest.raises(ValueError, match=r"makes 8 stages but the model has 6 layers"):
        stage_layers("dualpipev", 4, 6)
