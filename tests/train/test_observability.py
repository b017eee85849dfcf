"""Seeing a run: the per-step figures and files a run writes, the profiler window, W&B offline,
launch/plot.py, and the config errors of these options."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, read_metrics, run_pretrain


@pytest.fixture(scope="module")
def observed_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("obs") / "run")
    overrides = ["+experiment=moe_tiny", "train.max_steps=4", "train.val_every=2", "train.resume=none",
                 "train.profile_steps=[2,3]", "checkpoint.every=0"]
    wandb = _has_wandb()
    if wandb:
        overrides += ["logging.wandb=true", "logging.wandb_mode=offline"]
    r = run_pretrain(run_dir, *overrides, env={"WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, r, wandb


def _has_wandb() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def test_each_record_has_mfu_and_peak_memory_and_the_progress_line_shows_them(observed_run):
    run_dir, r, _ = observed_run
    records = read_metrics(run_dir)
    assert all(0 < x["mfu"] and x["peak_mem_gib"] > 0.05 for x in records)
    assert "MFU " in r.stdout and " GiB" in r.stdout
    assert "over 1 x" in r.stdout and "measured 1024^3 float32 GEMM on cpu" in r.stdout


def test_evaluations_report_mtp_accuracy_and_heldout_maxvio(observed_run):
    run_dir, _, _ = observed_run
    evals = [x for x in read_metrics(run_dir) if "val_loss" in x]
    assert [x["step"] for x in evals] == [2, 4]
    for x in evals:
        for key in ("val_acc", "val_mtp1_acc", "val_mtp1_accept", "val_mtp1_loss", "val_max_vio"):
            assert key in x, key
        assert 0 <= x["val_mtp1_acc"] <= 1 and x["val_max_vio"] >= 0


def test_expert_loads_are_written_per_logging_interval(observed_run):
    run_dir, _, _ = observed_run
    with open(os.path.join(run_dir, "expert_load.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    for x in records:
        assert len(x["load"]) == 3 and all(len(row) == 8 for row in x["load"])  # 2 MoE layers + MTP, 8 experts
        assert all(abs(sum(row) - 1) < 1e-4 for row in x["load"])


def test_profile_steps_write_a_trace_with_those_steps_and_memory(observed_run):
    run_dir, r, _ = observed_run
    stem = os.path.join(run_dir, "profile", "rank0.steps2-3")
    with open(stem + ".pt.trace.json") as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and "ProfilerStep#4" not in names
    assert "[memory]" in names  # allocation events (profile_memory)
    with open(stem + ".txt") as f:
        table = f.read()
    assert "CPU Mem" in table and "aten::mm" in table
    assert "profiling steps 2-3" in r.stdout


def test_wandb_offline_run_holds_the_metrics(observed_run):
    run_dir, _, wandb = observed_run
    if not wandb:
        pytest.skip("wandb is not installed (pip install wandb)")
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "*.wandb"))  # the run's record, for `wandb sync`


def test_plot_writes_every_picture_for_runs_overlaid(observed_run, tmp_path):
    run_dir, _, _ = observed_run
    out = str(tmp_path / "plots")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plot.py"), run_dir, run_dir + "/../run",
                        "--out", out], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = set(os.listdir(out))
    assert {"loss.png", "lr.png", "grad_norm.png", "max_vio.png"} <= names
    assert any(n.startswith("expert_load_") for n in names)
    assert any(n.startswith("profile_") for n in names)  # the run has a train.profile_steps trace
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plot.py"), str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_profile_phases_class_a_steps_operators_and_sum_self_times():
    from dsv3.train.plots import profile_phases

    def x(name, ts, dur, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}

    # one step of two micro-batches (forward, backward, forward, backward), clipping, the optimizer
    events = [x("PyTorch Profiler (0)", 0, 1000, "Trace"), x("ProfilerStep#5", 0, 100, "user_annotation"),
              x("aten::linear", 0, 10), x("aten::mm", 1, 6),
              x("autograd::engine::evaluate_function: MmBackward0", 10, 20), x("aten::mm", 11, 8),
              x("aten::linear", 30, 10), x("aten::mm", 31, 6),
              x("autograd::engine::evaluate_function: MmBackward0", 40, 20), x("aten::mm", 41, 8),
              x("aten::norm", 60, 5), x("Optimizer.step#AdamW.step", 70, 30, "user_annotation"), x("aten::add_", 71, 9)]
    steps, spans, self_time = profile_phases({"traceEvents": events})
    assert [e["name"] for e in steps] == ["ProfilerStep#5"]
    assert spans == [("forward", 0, 10), ("backward", 10, 30), ("forward", 30, 40), ("backward", 40, 60),
                     ("other", 60, 65), ("optimizer", 70, 100)]
    assert self_time == {"aten::linear": 8, "aten::mm": 28, "autograd::engine::evaluate_function: MmBackward0": 24,
                         "aten::norm": 5, "Optimizer.step#AdamW.step": 21, "aten::add_": 9}


@pytest.mark.parametrize("override, message", [
    ("train.profile_steps=[3,2]", "train.profile_steps=[3, 2]"),
    ("train.profile_steps=[50,60]", "must start at or before train.max_steps"),
    ("logging.wandb_mode=cloud", "logging.wandb_mode='cloud'"),
])
def test_bad_options_exit_2_naming_the_key(tmp_path, override, message):
    r = run_pretrain(str(tmp_path / "run"), "+experiment=moe_tiny", override)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_wandb_without_the_package_is_a_config_error(monkeypatch):
    import dsv3.train.wandb_sink as sink
    from dsv3.config.errors import ConfigError
    from dsv3.config.schema import Config
    from dsv3.config.rules import World
    from dsv3.train.config_rules import observability_rules

    monkeypatch.setattr(sink, "wandb_available", lambda: False)  # as on a machine without it
    cfg = Config()
    cfg.logging.wandb = True
    with pytest.raises(ConfigError, match=r"logging.wandb=True: needs the wandb package.*pip install wandb"):
        observability_rules(cfg, World())
    cfg.logging.wandb = False
    observability_rules(cfg, World())  # off: no wandb needed
