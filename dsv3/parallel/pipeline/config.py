"""What a pipeline schedule needs of ``parallel.pp``, ``parallel.pp_schedule``, ``parallel.microbatches`` and
``parallel.seq_chunks`` (one of the parallel plan's config rules, dsv3/parallel/config_rules.py)."""
from __future__ import annotations

from dsv3.config.rules import require

SCHEDULE_NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev", "seq1f1b")
PAIR_SCHEDULES = ("dualpipe", "dualpipev")   # the schedules with overlapped F&B pairs


def validate_pipeline(pp: int, schedule: str, microbatches: int, n_layers: int) -> None:
    """Raise `dsv3.config.ConfigError` (a ValueError) naming the key, the value and what is allowed if
    the combination cannot run. `n_layers` is the number of transformer layers cut into stages.

    Rules: pp >= 1; a known schedule; microbatches >= 1; DualPipe needs an even pp and an even
    number of micro-batches >= 2*pp (half enter at each end); DualPipeV needs >= 2*pp
    micro-batches (its 2*pp stages are always an even number, so pp itself may be odd); every
    stage needs at least one layer (DualPipeV has 2*pp stages).
    """
    require(schedule in SCHEDULE_NAMES, "parallel.pp_schedule", schedule,
             f"must be one of {', '.join(SCHEDULE_NAMES)}")
    require(isinstance(pp, int) and pp >= 1, "parallel.pp", pp,
             "must be an integer >= 1 (the number of pipeline ranks)")
    require(isinstance(microbatches, int) and microbatches >= 1, "parallel.microbatches",
             microbatches, "must be an integer >= 1")
    if schedule == "dualpipe":
        require(pp % 2 == 0, "parallel.pp", pp, "parallel.pp_schedule=dualpipe needs an even pp "
                 "(rank r pairs with rank pp-1-r); use an even pp or dualpipev")
        require(microbatches >= 2 * pp and microbatches % 2 == 0, "parallel.microbatches",
                 microbatches, f"parallel.pp_schedule=dualpipe with parallel.pp={pp} needs an even "
                 f"number >= 2*pp = {2 * pp} (half enter at each end)")
    if schedule == "dualpipev":
        require(microbatches >= 2 * pp, "parallel.microbatches", microbatches,
                 f"parallel.pp_schedule=dualpipev with parallel.pp={pp} needs >= 2*pp = {2 * pp}")
    stages = 2 * pp if schedule == "dualpipev" else pp
    most = n_layers // 2 if schedule == "dualpipev" else n_layers
    require(isinstance(n_layers, int) and n_layers >= stages, "parallel.pp", pp,
             f"parallel.pp_schedule={schedule} makes {stages} stages but the model has {n_layers} "
             f"layers and every stage needs one; allowed: pp <= {most}")


def validate_seq_chunks(pp: int, schedule: str, seq_chunks: int, seq_len: int) -> None:
    """Seq1F1B cuts every sequence into `seq_chunks` equal segments that flow as micro-batches."""
    require(isinstance(seq_chunks, int) and seq_chunks >= 1, "parallel.seq_chunks", seq_chunks,
            "must be an integer >= 1")
    if schedule != "seq1f1b":
        require(seq_chunks == 1, "parallel.seq_chunks", seq_chunks,
                f"must be 1 unless parallel.pp_schedule=seq1f1b (got {schedule}): only Seq1F1B cuts sequences")
        return
    require(pp > 1, "parallel.pp_schedule", schedule,
            "seq1f1b is a pipeline schedule: it needs parallel.pp > 1")
    require(seq_len % seq_chunks == 0, "parallel.seq_chunks", seq_chunks,
            f"must divide data.seq_len={seq_len} (segments of equal length)")
