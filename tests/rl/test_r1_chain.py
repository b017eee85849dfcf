"""launch/r1.py: the whole R1 chain (base -> cold-start SFT -> GRPO -> rejection sampling -> SFT on the
traces -> dense student distilled, and its gold-answer baseline -> held-out evaluation) at a few steps per
phase: every phase's outputs exist, each starts from the checkpoint of the phase the chain file names,
the student is dense, a second run skips every finished phase, and a changed command is refused."""
import json
import os
import subprocess
import sys

import pytest
from torch.distributed.checkpoint import FileSystemReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from dsv3.train.weights import checkpoint_step, model_config_of  # noqa: E402

# a few steps per phase; the rejection rules relaxed so that a barely trained model's samples are kept
TINY = {
    "all": ["train.device=cpu"],
    "base": ["train.max_steps=2", "data.seq_len=32", "optim.warmup_steps=1", "optim.decay_steps=1"],
    "sft": ["train.max_steps=30", "sft.examples=64", "train.val_every=0", "checkpoint.every=0"],
    "grpo": ["train.max_steps=1", "rl.prompts_per_step=2", "rl.num_generations=2", "rl.max_new_tokens=48",
             "rl.prompt_pool=8", "train.val_every=0", "train.micro_batch_size=4"],
    "rejection": ["rejection.problems=12", "rejection.num_samples=2", "rejection.max_new_tokens=48",
                  "rejection.require_correct=false", "rejection.require_format=false", "rejection.max_repetition=1"],
    "rejection_sft": ["train.max_steps=1", "sft.val_examples=1", "train.val_every=0", "checkpoint.every=0"],
    "student_base": ["train.max_steps=2", "data.seq_len=32", "optim.warmup_steps=1", "optim.decay_steps=1"],
    "distill": ["train.max_steps=1", "sft.val_examples=1", "train.val_every=0", "checkpoint.every=0"],
    "distill_gold": ["train.max_steps=1", "sft.val_examples=1", "train.val_every=0", "checkpoint.every=0"],
    "eval": ["rl.eval_problems=4", "rl.eval_samples=2", "rl.max_new_tokens=48"],
}
PHASES = ["base", "sft", "grpo", "rejection", "rejection_sft", "student_base", "distill", "distill_gold"]
STARTS = {"sft": "base", "grpo": "sft", "rejection": "grpo", "rejection_sft": "base", "distill": "student_base",
          "distill_gold": "student_base"}


def r1(out: str, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for phase, overrides in TINY.items() for o in overrides for a in ("--set", f"{phase}:{o}")]
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "r1.py"), "--out", out, *sets, *extra],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("r1") / "chain")
    r = r1(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_every_phase_ran_and_chains_by_init_from(chain):
    out, stdout = chain
    for phase in PHASES:
        record = json.load(open(os.path.join(out, phase, "phase.json")))
        assert record["cpu_s"] > 0 and record["init_from"] == STARTS.get(phase)
        start = STARTS.get(phase)
        if start:  # the run's config names the checkpoints of the phase it starts from; trainers load the latest
            cfg = open(os.path.join(out, phase, ".hydra", "config.yaml")).read()
            assert f"init_from: {os.path.join(out, start, 'checkpoints')}\n" in cfg
            if phase != "rejection":
                latest = checkpoint_step(os.path.join(out, start, "checkpoints"))
                assert f"initialized weights from {latest}\n" in open(os.path.join(out, phase, "phase.log")).read()
        if phase != "rejection":
            checkpoint_step(os.path.join(out, phase, "checkpoints"))  # raises when there is none
    traces = [json.loads(line) for line in open(os.path.join(out, "rejection", "traces.jsonl"))]
    gold = [json.loads(line) for line in open(os.path.join(out, "rejection", "traces.gold.jsonl"))]
    assert traces and len(gold) == 12 and {t["prompt"] for t in traces} <= {g["prompt"] for g in gold}
    # the student is dense: its config says so, and its weights hold no router, expert or MTP module
    step = checkpoint_step(os.path.join(out, "distill", "checkpoints"))
    m = model_config_of(step)
    assert m.n_dense_layers == m.n_layers and m.mtp_depth == 0
    names = list(FileSystemReader(step).read_metadata().state_dict_metadata)
    assert any("ffn.w1" in k for k in names)
    assert not any(".gate." in k or "experts" in k or "mtp" in k for k in names)

def test_summary_table(chain):
    out, stdout = chain
    rows = json.load(open(os.path.join(out, "summary.json")))["rows"]
    assert [r["phase"] for r in rows] == ["sft", "grpo", "rejection_sft", "distill", "distill_gold"]
    assert all(0 <= r["pass@1"] <= r["pass@2"] <= 1 and r["problems"] == 4 for r in rows)
    assert "| phase | pass@1 | pass@2 |" in stdout and "| distill_gold |" in stdout


def test_second_run_skips_finished_phases_and_refuses_a_changed_one(chain):
    out, _ = chain
    again = r1(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done before") == len(PHASES) + 5 and "running" not in again.stdout
    changed = r1(out, "--set", "grpo:rl.temperature=0.5")
    assert changed.returncode == 2 and "phase grpo finished before with another command" in changed.stderr


def test_bad_chain_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases:\n  - {name: sft, launcher: sft, experiment: sft_tiny, init_from: base}\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "r1.py"), "--chain", str(bad), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "init_from 'base' is not an earlier phase" in r.stderr


def test_evaluations_asking_for_more_held_out_problems_than_exist_are_refused_before_any_phase(tmp_path):
    # the default chain evaluates grpo_arith_tiny's levels 1 and 2; level 1 has 12 held-out problems
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "r1.py"), "--out", str(out),
                        "--set", "eval:rl.eval_problems=96"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "evaluate: invalid config: rl.eval_problems=96" in r.stderr and "rl.eval_difficulties" in r.stderr
    assert not out.exists() and "running" not in r.stdout
