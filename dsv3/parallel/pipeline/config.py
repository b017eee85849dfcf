"""Validation of the pipeline config keys ``parallel.pp``, ``parallel.pp_schedule``,
``parallel.microbatches`` (the Hydra schema lives in dsv3/config and calls this)."""
from __future__ import annotations

SCHEDULE_NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def validate_pipeline(pp: int, schedule: str, microbatches: int, n_layers: int) -> None:
    """Raise ValueError naming the key, the value and what is allowed, if the combination cannot
    run. `n_layers` is the number of transformer layers to cut into stages.

    Rules: pp >= 1; a known schedule; microbatches >= 1; DualPipe needs an even pp and an even
    number of micro-batches >= 2*pp (half enter at each end); DualPipeV needs >= 2*pp
    micro-batches (its 2*pp stages are always an even number, so pp itself may be odd); every
    stage needs at least one layer (DualPipeV has 2*pp stages).
    """
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"parallel.pp_schedule={schedule!r} is not a known schedule; allowed: "
                         f"{', '.join(SCHEDULE_NAMES)}")
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"parallel.pp={pp!r} must be an integer >= 1 (number of pipeline ranks)")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"parallel.microbatches={microbatches!r} must be an integer >= 1")
    if schedule == "dualpipe":
        if pp % 2:
            raise ValueError(f"parallel.pp={pp} is odd; parallel.pp_schedule=dualpipe needs an "
                             f"even pp (rank r pairs with rank pp-1-r); use an even pp or "
                             f"dualpipev")
        if microbatches < 2 * pp or microbatches % 2:
            raise ValueError(f"parallel.microbatches={microbatches} with "
                             f"parallel.pp_schedule=dualpipe and parallel.pp={pp}: needs an even "
                             f"number >= 2*pp = {2 * pp}")
    if schedule == "dualpipev" and microbatches < 2 * pp:
        raise ValueError(f"parallel.microbatches={microbatches} with parallel.pp_schedule="
                         f"dualpipev and parallel.pp={pp}: needs >= 2*pp = {2 * pp}")
    stages = 2 * pp if schedule == "dualpipev" else pp
    if not isinstance(n_layers, int) or n_layers < stages:
        raise ValueError(f"parallel.pp={pp} with parallel.pp_schedule={schedule} makes {stages} "
                         f"stages but the model has {n_layers} layers; every stage needs at "
                         f"least one layer, so allowed: pp <= "
                         f"{n_layers // 2 if schedule == 'dualpipev' else n_layers}")
