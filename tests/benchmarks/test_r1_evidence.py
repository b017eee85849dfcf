"""benchmarks/r1_evidence.py charges each evaluated checkpoint of a control the CPU its run had spent up to
that checkpoint (plus the CPU spent before the run): the comparison of docs/r1.md rests on it. Checked on
hand-made run directories whose answers are worked out by hand here."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import r1_evidence  # noqa: E402


def write_run(run_dir, times: dict[int, float], time_txt: str) -> None:
    os.makedirs(run_dir / "checkpoints", exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "time": t}) + "\n"
                                                   for s, t in times.items()))
    (run_dir / "time.txt").write_text(time_txt)


def write_eval(eval_dir, checkpoint, pass1: float) -> None:
    os.makedirs(eval_dir, exist_ok=True)
    (eval_dir / "eval.json").write_text(json.dumps({"pass@1": pass1, "pass@4": 0.5, "stderr/pass@1": 0.01,
                                                    "format": 1.0, "problems": 200, "samples": 4,
                                                    "checkpoint": str(checkpoint)}))


def test_a_checkpoint_is_charged_its_share_of_the_run_cpu_plus_the_cost_before_it(tmp_path):
    run = tmp_path / "sft"
    # 400 wall seconds, 150 + 50 CPU: a checkpoint at wall 100 s is a quarter of the run, 50 CPU seconds.
    write_run(run, {250: 100.0, 500: 200.0, 1000: 400.0}, "400.0 150.0 50.0\n")
    write_eval(tmp_path / "e1000", run / "checkpoints" / "step_00001000", 0.4)
    write_eval(tmp_path / "e250", run / "checkpoints" / "step_00000250", 0.2)
    (tmp_path / "pool.time").write_text("30.0 20.0 5.0\n")
    extra = r1_evidence.time_file_cpu(str(tmp_path / "pool.time"))
    assert extra == 25.0
    s = r1_evidence.series_summary([str(tmp_path / "e1000"), str(tmp_path / "e250")], extra)
    assert [(p["step"], p["cpu_s"], p["pass@1"]) for p in s["points"]] == [(250, 75.0, 0.2), (1000, 225.0, 0.4)]


def test_a_run_without_a_finished_time_file_is_refused(tmp_path):
    run = tmp_path / "grpo"
    write_run(run, {0: 1.0, 10: 20.0}, "")
    with pytest.raises(SystemExit, match="no complete time.txt"):
        r1_evidence.cpu_clock(str(run))
