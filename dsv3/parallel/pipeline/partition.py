"""Which layers each stage holds, and which stages each rank holds, for every schedule.

The model is a list of `n_layers` transformer layers; the first stage also runs the embedding and
the last one the output head (and MTP), so they may be given fewer layers: `first_extra` and
`last_extra` are those parts' costs in units of one layer (e.g. V3's head + MTP block is worth
well over one layer). The model engineer cuts the module list with these ranges.
"""
from __future__ import annotations

from functools import lru_cache

from .config import validate_pipeline


def n_stages(schedule: str, pp: int) -> int:
    """Number of model stages: pp, or 2*pp for DualPipeV (two stages per rank, V-shaped)."""
    return 2 * pp if schedule == "dualpipev" else pp


def rank_stages(schedule: str, pp: int, rank: int) -> list[int]:
    """The stages whose parameters live on `rank` (the same as `Schedule.stages_on_rank`).

    1F1B/ZB1P: [rank]. DualPipe: [rank, pp-1-rank] (each stage is held twice, the copies'
    gradients are summed after the step). DualPipeV: [rank, 2pp-1-rank], so rank 0 holds the
    first and the last stage (embedding and head + MTP on one rank, as the V3 report places them).
    """
    if not 0 <= rank < pp:
        raise ValueError(f"rank must be in [0, {pp}) for parallel.pp={pp}; got {rank}")
    if schedule == "dualpipe":
        return sorted({rank, pp - 1 - rank})
    if schedule == "dualpipev":
        return [rank, 2 * pp - 1 - rank]
    return [rank]


def partition_layers(n_layers: int, n_stages: int, first_extra: float = 0.0,
                     last_extra: float = 0.0) -> list[range]:
    """Split layers 0..n_layers-1 into `n_stages` contiguous, non-empty ranges.

    Minimizes the cost of the most expensive stage (a stage's cost is its number of layers, plus
    `first_extra` on stage 0 and `last_extra` on the last stage); among those splits it takes the
    most even one (least sum of squared costs), earlier stages taking the extra layer on a tie.
    """
    if n_stages < 1 or n_layers < n_stages:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} non-empty stages; "
                         f"need 1 <= stages <= layers")
    if first_extra < 0 or last_extra < 0:
        raise ValueError(f"first_extra and last_extra must be >= 0; got {first_extra}, "
                         f"{last_extra}")

    def cost(stage: int, layers: int) -> float:
        first = first_extra if stage == 0 else 0.0
        return layers + first + (last_extra if stage == n_stages - 1 else 0.0)

    @lru_cache(maxsize=None)
    def best(stage: int, start: int) -> tuple[tuple[float, float], tuple[int, ...]]:
        """Best split of layers start.. over stages stage..: ((max cost, sum sq), sizes)."""
        left = n_stages - stage
        if left == 1:
            c = cost(stage, n_layers - start)
            return (c, c * c), (n_layers - start,)
        options = []
        for size in range(n_layers - start - (left - 1), 0, -1):   # larger first: ties go early
            (mx, sq), rest = best(stage + 1, start + size)
            c = cost(stage, size)
            options.append(((max(mx, c), sq + c * c), (size,) + rest))
        return min(options, key=lambda o: o[0])

    sizes = best(0, 0)[1]
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def stage_layers(schedule: str, pp: int, n_layers: int, first_extra: float = 0.0,
                 last_extra: float = 0.0) -> dict[int, list[tuple[int, range]]]:
    """For each rank, the (stage, layer range) pairs it holds under `schedule`."""
    validate_pipeline(pp, schedule, max(2 * pp, 1), n_layers)
    ranges = partition_layers(n_layers, n_stages(schedule, pp), first_extra, last_extra)
    return {r: [(s, ranges[s]) for s in rank_stages(schedule, pp, r)] for r in range(pp)}
