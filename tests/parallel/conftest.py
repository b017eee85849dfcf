"""Set-up shared by the plan-parity tests of this folder (composed plans, pipelines, ZeRO): one run per
(steps, processes, overrides) for the whole session, so that the single-process reference they all
compare with, and any run two modules need, runs once."""
import re

import pytest

from tests.helpers import checked, run_pretrain, run_torchrun
from tests.parallel.plan_testing import plan_args


@pytest.fixture(scope="session")
def plan_runs(tmp_path_factory):
    """run(steps, nproc, *overrides) -> (run directory, stdout), once per session: one process runs
    launch/pretrain.py, more run it under torchrun. Without a train.resume override it starts fresh."""
    done: dict[tuple, tuple[str, str]] = {}

    def run(steps: int, nproc: int, *overrides: str) -> tuple[str, str]:
        key = (steps, nproc, overrides)
        if key not in done:
            name = re.sub(r"[^\w]+", "_", "-".join((f"n{nproc}_s{steps}",) + overrides))[:60]
            run_dir = str(tmp_path_factory.mktemp(name))
            launch = run_pretrain if nproc == 1 else lambda d, *a, **k: run_torchrun(nproc, d, *a, **k)
            fresh = () if any(o.startswith("train.resume=") for o in overrides) else ("train.resume=none",)
            r = checked(launch(run_dir, *plan_args(steps), *overrides, *fresh, timeout=600))
            done[key] = run_dir, r.stdout
        return done[key]

    return run
