"""The planner against measured steps: bytes per component (parameters, gradients, optimizer state,
activations) that one real training step of moe_tiny holds on CPU, next to what dsv3.planner says for the
same config, for the plans of tests/planner (one process: precisions and model shapes; two gloo
processes: pipelines incl. Seq1F1B, expert parallelism), and Seq1F1B's activations against 1F1B's at the
same global batch and sequence length.

    python benchmarks/plan_vs_measured.py        # ~2 minutes on 2 cores; docs/plan_vs_measured.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dsv3.parallel.mesh import Env  # noqa: E402
from tests.parallel.distributed_testing import run_workers  # noqa: E402
from tests.planner import test_memory_distributed as two_ranks  # noqa: E402
from tests.planner import test_memory_measured as one_rank  # noqa: E402
from tests.planner.memory_cases import COMPONENTS, compose_config, measure_step, planned, relative_errors  # noqa: E402


def single_process() -> list[dict]:
    rows = []
    for name, overrides in one_rank.PLANS.items():
        cfg = compose_config("data.seq_len=48", "train.global_batch_size=4", "train.micro_batch_size=2", *overrides)
        measured = measure_step(cfg, Env(0, 1, 0, torch.device("cpu")))
        (plan,) = planned(cfg, 1)
        rows.append(dict(plan=name, ranks=1, pp_rank=0, measured={k: measured[k] for k in COMPONENTS},
                         planned=plan, error=relative_errors(measured, plan)))
    return rows


def two_processes() -> list[dict]:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        run_workers(two_ranks._worker, 2, out, timeout=600)
        results = dict(out)
    return [dict(plan=name, ranks=2, pp_rank=measured["pp_rank"], rank=rank,
                 measured={k: measured[k] for k in COMPONENTS}, planned=plan, error=errors)
            for (name, rank), (measured, plan, errors) in sorted(results.items())]


def main() -> None:
    torch.set_num_threads(1)
    rows = single_process() + two_processes()
    print("| plan | rank | " + " | ".join(f"{c} measured / planned (error)" for c in COMPONENTS) + " |")
    print("|---|---|" + "---|" * len(COMPONENTS))
    for r in rows:
        cells = [f"{r['measured'][c] / 2 ** 10:.0f} / {r['planned'][c] / 2 ** 10:.0f} KiB ({r['error'][c]:.1%})"
                 for c in COMPONENTS]
        print(f"| {r['plan']} | {r.get('rank', 0)} | " + " | ".join(cells) + " |")
    worst = max(e for r in rows for e in r["error"].values())
    print(f"\nlargest error of any component: {worst:.2%}")
    act = {(r["plan"], r.get("rank", 0)): r["measured"]["activations"] for r in rows if r["ranks"] == 2}
    seq = {f"rank {k}": {"1f1b": act["pp2 1f1b", k], "seq1f1b": act["pp2 seq1f1b", k]} for k in range(2)}
    for k, v in seq.items():
        print(f"{k}: activations measured 1F1B {v['1f1b'] / 2 ** 20:.2f} MiB, Seq1F1B (4 segments) "
              f"{v['seq1f1b'] / 2 ** 20:.2f} MiB ({v['seq1f1b'] / v['1f1b'] - 1:+.0%})")
    out = ROOT / "docs" / "plan_vs_measured.json"
    out.write_text(json.dumps(dict(rows=rows, largest_error=worst, seq1f1b_vs_1f1b=seq), indent=1) + "\n")
    print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
