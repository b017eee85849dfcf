"""Pipeline parallelism: schedules as data, a simulator, and a generic executor (docs/architecture.md, section 5).

- `generators`: 1F1B, ZB1P, DualPipe, DualPipeV, Seq1F1B -> `Schedule` (per-rank instruction lists);
- `simulator`: timeline, bubble, peak memory (reproduces the V3 report's Table 2), deadlock check;
- `timeline`: the timeline as a PNG (matplotlib, optional);
- `executor`: runs a `Schedule` over torch.distributed P2P with user `Stage`s;
- `backward_split`: input-gradient / weight-gradient split of a stage's backward (B = I + W);
- `config`: `validate_pipeline` for the ``parallel.*`` keys; `partition`: layers -> stages.
"""
from .config import validate_pipeline
from .executor import BackwardTask, ForwardTask, PipelineExecutor, Stage, StepResult
from .generators import SCHEDULES, build_schedule, dualpipe, dualpipev, one_f_one_b, seq1f1b, zb1p
from .partition import n_stages, partition_layers, rank_stages, stage_layers
from .schedule import Instr, Op, Schedule, ScheduleError, validate_schedule
from .simulator import Costs, Deadlock, SimResult, check_blocking_comms, simulate

__all__ = [
    "validate_pipeline",
    "BackwardTask", "ForwardTask", "PipelineExecutor", "Stage", "StepResult",
    "SCHEDULES", "build_schedule", "dualpipe", "dualpipev", "one_f_one_b", "seq1f1b", "zb1p",
    "n_stages", "partition_layers", "rank_stages", "stage_layers",
    "Instr", "Op", "Schedule", "ScheduleError", "validate_schedule",
    "Costs", "Deadlock", "SimResult", "check_blocking_comms", "simulate",
]
