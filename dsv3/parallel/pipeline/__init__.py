"""Pipeline parallelism: schedules as data, a simulator, and a generic executor (DESIGN.md §4).

- `generators`: 1F1B, ZB1P, DualPipe, DualPipeV -> `Schedule` (per-rank instruction lists);
- `simulator`: timeline, bubble, peak memory (reproduces the V3 report's Table 2), deadlock check;
- `timeline`: the timeline as a PNG (matplotlib, optional);
- `executor`: runs a `Schedule` over torch.distributed P2P with user `Stage`s;
- `backward_split`: input-gradient / weight-gradient split of a stage's backward (B = I + W);
- `config`: `validate_pipeline` for the ``parallel.*`` keys; `partition`: layers -> stages.
"""
from .generators import SCHEDULES, build_schedule, dualpipe, dualpipev, one_f_one_b, zb1p
from .schedule import Instr, Op, Schedule, ScheduleError, validate_schedule
from .simulator import Costs, Deadlock, SimResult, check_blocking_comms, simulate

__all__ = [
    "SCHEDULES", "build_schedule", "dualpipe", "dualpipev", "one_f_one_b", "zb1p",
    "Instr", "Op", "Schedule", "ScheduleError", "validate_schedule",
    "Costs", "Deadlock", "SimResult", "check_blocking_comms", "simulate",
]
