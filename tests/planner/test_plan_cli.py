"""launch/plan.py as a user runs it: the table, --json with the same numbers, a wrong config named with
exit 2 before any planning, and the trainer's startup line from the same code."""
import json
import os
import subprocess
import sys

from tests.helpers import ROOT, run_pretrain

PLAN = os.path.join(ROOT, "launch", "plan.py")


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PLAN, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_table_and_json_agree():
    table = plan("+experiment=h100_card")
    assert table.returncode == 0, table.stderr[-2000:]
    out = json.loads(plan("--json", "+experiment=h100_card").stdout)
    assert out["fits"] is True and out["plan"]["world"] == 1 and out["hardware"]["name"] == "h100_80gb"
    worst = max(r["total"] for r in out["memory"])
    assert f"fits: {worst / 2 ** 30:.2f} of" in table.stdout
    assert f"largest micro-batch that fits (activation checkpointing none): {out['largest_micro_batch']}" in table.stdout
    # what each recomputation mode would leave on the fullest rank: none is the plan itself
    assert out["by_recompute"]["none"] == worst and out["by_recompute"]["full"] < worst
    assert out["least_recompute_that_fits"] == "none" and "the least recomputation that fits: none" in table.stdout
    assert f"{out['timing']['gpu_hours_per_trillion_tokens'] / 1e3:.1f}K GPU-hours per trillion tokens" in table.stdout


def test_a_wrong_config_exits_2_naming_the_key():
    r = plan("+experiment=moe_tiny", "parallel.seq_chunks=4")
    assert r.returncode == 2 and "parallel.seq_chunks" in r.stderr and r.stdout == ""
    r = plan("+experiment=rtx_card", "--world-size=2")
    assert r.returncode == 2 and "rtx_4090 has 1 GPUs" in r.stderr


def test_the_trainer_states_what_the_plan_needs(tmp_path):
    r = run_pretrain(str(tmp_path), "+experiment=moe_tiny", "train.max_steps=1", "train.resume=none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "this plan needs ~" in r.stdout + r.stderr
