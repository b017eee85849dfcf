"""GRPO end to end on a tiny checkpoint: the launcher, the rollout -> reward -> advantage -> update
loop, the first inner step's exact ratio of 1 and KL of 0, micro-batching and resuming that do not
change a step, and config errors that name the key.

A two-step pretrained model writes noise, so the task rewards (accuracy, format) are 0 for every
sample and carry no signal. The runs that need one add a test reward (the share of digits in the
completion) to the registry in-process, and run the launcher's `prepare` and `GRPOTrainer` there."""
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dsv3.config.errors import ConfigError
from dsv3.rl import rewards as reward_registry
from dsv3.train.weights import tokenizer_path_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "rl"))
from helpers import read_metrics, run_pretrain  # noqa: E402

GRPO = os.path.join(ROOT, "launch", "grpo.py")
spec = importlib.util.spec_from_file_location("launch_grpo", GRPO)
launch_grpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch_grpo)  # registers the config schema with Hydra


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    r = run_pretrain(str(run), "+experiment=moe_tiny", "train.max_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    # beside the checkpoints, where fine-tuning runs keep theirs: found without rebuilding the corpus' path
    shutil.copy(tokenizer_path_of(str(run / "checkpoints" / "step_00000002")), run / "checkpoints")
    return str(run / "checkpoints")


from grpo_with_test_reward import digits  # noqa: E402  (the share of digits in the completion)


@pytest.fixture
def digit_reward(monkeypatch):
    monkeypatch.setitem(reward_registry.REWARDS, "digits", digits)


def compose(base: str, run_dir: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dsv3.config.store import to_config

    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        return to_config(hydra_compose("config", overrides=[
            "+experiment=grpo_tiny", f"checkpoint.init_from={base}", f"checkpoint.dir={run_dir}/checkpoints",
            "train.threads=1", "train.device=cpu", *overrides]))


def run_in_process(base: str, run_dir: str, *overrides: str, trainer_out: list | None = None) -> list[dict]:
    from dsv3.config.validate import validate
    from dsv3.parallel.mesh import Env
    from dsv3.rl.grpo import GRPOTrainer

    cfg = compose(base, run_dir, *overrides)
    tokenizer = launch_grpo.prepare(cfg)
    validate(cfg)
    os.makedirs(run_dir, exist_ok=True)
    trainer = GRPOTrainer(cfg, run_dir, Env(0, 1, 0, torch.device("cpu")), tokenizer)
    trainer.run()
    if trainer_out is not None:
        trainer_out.append(trainer)
    return read_metrics(run_dir)


SIGNAL = ["rewards=[{name:digits,weight:1.0},{name:format,weight:0.1}]", "rl.mu=2", "rl.beta=0.05",
          "rl.epsilon_high=0.28", "rl.loss_aggregation=token_mean", "rl.eval_problems=1", "train.max_steps=2",
          "train.global_batch_size=16"]


def test_launcher_runs_grpo_end_to_end(base_checkpoint, tmp_path):
    """launch/grpo.py from a pretrained checkpoint: every metric of a step is logged, the first step's
    policy is the reference (k3 KL exactly 0) and its ratio exactly 1, checkpoints and the extended
    tokenizer are written."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, GRPO, f"hydra.run.dir={run}", "+experiment=grpo_tiny", "train.threads=1",
                        f"checkpoint.init_from={base_checkpoint}", f"checkpoint.dir={run}/checkpoints"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(str(run))
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward", "reward_std", "reward/accuracy", "reward/format", "accuracy", "kl", "clip_frac/low",
                "clip_frac/high", "entropy", "completion_length", "completion_length_max", "truncation_rate",
                "frac_zero_std", "logprob_diff/mean_abs", "logprob_diff/max_abs", "sampling_tokens_per_s",
                "training_tokens_per_s", "eval/pass@1", "eval/pass@2"):
        assert key in metrics[-1], key
    assert metrics[0]["kl"] == 0.0 and metrics[0]["ratio_first_step_max_dev"] == 0.0
    assert metrics[0]["logprob_diff/max_abs"] < 1e-4   # the sampler's log-probs are the trainer's (fp32)
    assert os.path.isfile(run / "checkpoints" / "tokenizer.json")
    assert os.path.isdir(run / "checkpoints" / "step_00000002")


def gate_biases(trainer) -> dict[str, list[float]]:
    return {n: b.tolist() for n, b in trainer.model.state_dict().items() if n.endswith("gate.bias")}


def start_biases(trainer) -> dict[str, list[float]]:
    from dsv3.model import Transformer
    from dsv3.train.weights import load_initial_weights

    model = Transformer(trainer.cfg.model)
    load_initial_weights(trainer.cfg.checkpoint.init_from, model, trainer.cfg.model)
    return {n: b.tolist() for n, b in model.state_dict().items() if n.endswith("gate.bias")}


def test_expert_bias_update_and_mtp_training(base_checkpoint, tmp_path, digit_reward):
    """rl.expert_bias=update moves the routing bias on the RL batch's loads; rl.mtp=train trains the MTP
    module on the sampled completions (its loss is logged)."""
    trainers = []
    metrics = run_in_process(base_checkpoint, str(tmp_path / "u"), *SIGNAL, "train.max_steps=1",
                             "rl.expert_bias=update", "rl.mtp=train", trainer_out=trainers)
    assert metrics[0]["mtp_loss"] > 0
    assert gate_biases(trainers[0]) != start_biases(trainers[0])


def test_update_loop_micro_batching_and_resuming(base_checkpoint, tmp_path, digit_reward):
    """With rewards that differ within groups the policy moves: gradients flow, the second step's policy
    differs from the reference (KL > 0) while every first inner step still has ratio exactly 1. The token
    weights of the loss come from the whole batch: 4 micro-batches of 4 sequences give the step of one
    micro-batch of 16. A run stopped after step 1 and resumed gives step 2 of the full run."""
    trainers: list = []
    split = run_in_process(base_checkpoint, str(tmp_path / "split"), *SIGNAL, "train.micro_batch_size=4",
                           trainer_out=trainers)
    first, second = split
    assert first["frac_zero_std"] < 1 and first["advantage_abs_mean"] > 0 and first["reward/digits"] > 0
    assert first["grad_norm"] > 0 and first["kl"] == 0.0 and second["kl"] > 0
    assert first["ratio_first_step_max_dev"] == 0.0 and second["ratio_first_step_max_dev"] == 0.0
    assert "mtp_loss" not in first                              # rl.mtp=off: the MTP module is not run
    assert gate_biases(trainers[0]) == start_biases(trainers[0])  # rl.expert_bias=freeze
    whole = run_in_process(base_checkpoint, str(tmp_path / "whole"), *SIGNAL, "train.micro_batch_size=16")
    for a, b in zip(whole, split):
        assert a["reward"] == b["reward"]                       # the same samples
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # data parallel, 2 ranks (torchrun): each samples half the prompts, all see every group, each trains
    # on 8 of the 16 rows in 2 micro-batches of 4: the steps of the single process
    dp_dir = tmp_path / "dp2"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "rl", "grpo_with_test_reward.py"), f"hydra.run.dir={dp_dir}",
                        "+experiment=grpo_tiny", "train.threads=1", f"checkpoint.init_from={base_checkpoint}",
                        f"checkpoint.dir={dp_dir}/checkpoints", *SIGNAL, "train.micro_batch_size=4"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(read_metrics(str(dp_dir)), split):
        assert a["reward"] == b["reward"]
        for key in ("loss", "grad_norm", "kl", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    resumed_dir = str(tmp_path / "resumed")
    run_in_process(base_checkpoint, resumed_dir, *SIGNAL, "train.micro_batch_size=4", "train.max_steps=1")
    resumed = run_in_process(base_checkpoint, resumed_dir, *SIGNAL, "train.micro_batch_size=4", "train.resume=auto")
    step2 = [m for m in resumed if m["step"] == 2][0]
    for key in ("reward", "loss", "grad_norm", "kl"):
        assert step2[key] == second[key], key


def test_dynamic_sampling_and_truncation_masking(base_checkpoint, tmp_path, digit_reward):
    """DAPO's switches. Dynamic sampling with a reward that is 0 for every sample (no group has a
    signal): every round's groups are dropped, `max_sampling_rounds` rounds are drawn, and the step
    makes no update. Masking truncated completions when all of them are cut (a noise model never stops
    within 12 tokens): no token counts, so the loss and the gradient are 0 though the rewards differ."""
    dynamic = run_in_process(base_checkpoint, str(tmp_path / "d"), *SIGNAL, "train.max_steps=1",
                             "rewards=[{name:format,weight:1.0}]", "rl.dynamic_sampling=true",
                             "rl.max_sampling_rounds=2")[0]
    assert (dynamic["sampling_rounds"], dynamic["prompts_drawn"], dynamic["groups_kept"]) == (2, 8, 0)
    assert dynamic["no_signal"] == 1 and dynamic["frac_zero_std"] == 1.0 and dynamic["skipped"] == 0
    masked = run_in_process(base_checkpoint, str(tmp_path / "m"), *SIGNAL, "train.max_steps=1",
                            "rl.mask_truncated=true", "rl.scale_advantages=false", "rl.loss_aggregation=constant")[0]
    assert masked["truncation_rate"] == 1.0 and masked["advantage_abs_mean"] > 0
    assert masked["loss"] == 0.0 and masked["grad_norm"] == 0.0


@pytest.fixture(scope="module")
def grpo_config(base_checkpoint, tmp_path_factory):
    return compose(base_checkpoint, str(tmp_path_factory.mktemp("cfg")))


@pytest.mark.parametrize("key,value", [
    ("rl.num_generations", 1), ("rl.kl_estimator", "k4"), ("rl.loss_aggregation", "seq_sum"), ("rl.epsilon", 1.5),
    ("rl.temperature", 0.0), ("rl.expert_bias", "learn"), ("rl.mu", 0), ("rl.constant_normalizer", 0),
    ("rl.prompt_pool", 400), ("rl.eval_problems", 100),   # more difficulty-1 problems than exist
    ("parallel.ep", 2), ("precision.dtype", "fp8"), ("precision.dtype", "fp16"), ("parallel.zero", 1), ("rejection.num_samples", 0), ("rejection.max_repetition", 2.0)])
def test_bad_settings_are_refused_naming_the_key(grpo_config, key, value):
    """What launch/grpo.py checks before any work (it prints the error and exits 2)."""
    from dsv3.config.validate import validate

    cfg = copy.deepcopy(grpo_config)
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as e:
        launch_grpo.prepare(cfg)
        validate(cfg)
    assert str(e.value).startswith(f"invalid config: {key}={value!r}:"), str(e.value)


def test_config_errors_of_router_replay_and_rejection_problems(grpo_config):
    """rl.router_replay on a model without MoE layers; rejection.problems beyond what the task has (its
    launcher's check, before any work)."""
    from dsv3.config.rules import World
    from dsv3.config.validate import validate
    from dsv3.rl.config_rules import grpo_rules

    cfg = copy.deepcopy(grpo_config)
    launch_grpo.prepare(cfg)
    cfg.rl.router_replay = True
    validate(cfg)
    cfg.model.n_dense_layers = cfg.model.n_layers       # (the checkpoint's rule would refuse it first)
    with pytest.raises(ConfigError, match=r"^invalid config: rl.router_replay=True: needs MoE layers"):
        grpo_rules(cfg, World())
    spec = importlib.util.spec_from_file_location("launch_rejection", os.path.join(ROOT, "launch", "rejection_sample.py"))
    launch_rejection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_rejection)
    cfg = copy.deepcopy(grpo_config)
    cfg.rejection.problems = 400
    with pytest.raises(ConfigError, match=r"^invalid config: rejection.problems=400: asks 200 train problems of "
                                          r"arithmetic at difficulty 1 .* but only \d+ exist"):
        launch_rejection.prepare(cfg)


def test_router_replay_run_and_its_tensorboard_metrics(base_checkpoint, tmp_path, digit_reward):
    """rl.router_replay=true end to end: the first inner step still has ratio exactly 1 and KL exactly 0
    (the reference routes as the sampler did too), the sampler's log-probabilities are reproduced, the
    routing drift is logged; and the GRPO metrics reach TensorBoard with the values of metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path / "replay")
    m = run_in_process(base_checkpoint, run, *SIGNAL, "train.max_steps=1", "rl.router_replay=true")[-1]
    assert m["kl"] == 0.0 and m["ratio_first_step_max_dev"] == 0.0 and m["logprob_diff/max_abs"] < 1e-4
    assert 0 <= m["routing_drift/layer_tokens"] <= m["routing_drift/tokens"] <= 1 and m["grad_norm"] > 0
    events = EventAccumulator(os.path.join(run, "tb"))
    events.Reload()
    for key in ("reward", "kl", "logprob_diff/mean_abs", "routing_drift/tokens", "clip_frac/high"):
        assert events.Scalars(key)[-1].value == pytest.approx(m[key], rel=1e-6, abs=1e-12), key
    assert [e.step for e in events.Scalars("eval/pass@1")] == [1]


def test_rejection_sampling_launcher_writes_sft_data(base_checkpoint, tmp_path):
    """launch/rejection_sample.py: the kept traces (none from a model that writes noise: every sample is
    dropped, and why is counted) and the gold-answer twin, one line per problem."""
    run = tmp_path / "rs"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "rejection_sample.py"), f"hydra.run.dir={run}",
                        "+experiment=rejection_arith_tiny", f"checkpoint.init_from={base_checkpoint}",
                        "rejection.problems=4", "rejection.num_samples=2", "rejection.max_new_tokens=8"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.split("rejection sampling: ")[1].splitlines()[0])
    assert summary["samples"] == 8 and summary["kept"] == 0 and sum(summary["dropped"].values()) == 8
    assert (run / "traces.jsonl").read_text() == ""
    gold = [json.loads(line) for line in (run / "traces.gold.jsonl").read_text().splitlines()]
    assert len(gold) == 4 and all("<answer>" in g["completion"] for g in gold)


def test_evaluation_launcher_measures_the_held_out_problems_and_refuses_more_than_exist(base_checkpoint, tmp_path):
    """launch/evaluate.py: eval.json over the held-out problems asked for, the same numbers as the evaluation
    run in this process on the same config; asking for more held-out problems than a level has exits 2
    with the key named, before any weight is loaded."""
    from dsv3.rl.evaluate import evaluate_checkpoint, prepare_evaluation

    run = tmp_path / "ev"
    args = ["+experiment=grpo_arith_tiny", f"checkpoint.init_from={base_checkpoint}", "train.threads=1",
            "rl.eval_problems=6", "rl.eval_samples=2", "rl.max_new_tokens=8"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"hydra.run.dir={run}", *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["problems"] == 6 and result["samples"] == 2 and result["difficulties"] == [1, 2]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dsv3.config.store import to_config

    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        cfg = to_config(hydra_compose("config", overrides=[*args, f"checkpoint.dir={tmp_path}/again"]))
    here = evaluate_checkpoint(cfg, prepare_evaluation(cfg), torch.device("cpu"))
    assert {k: here[k] for k in ("pass@1", "pass@2", "format", "mean_length")} == \
        {k: result[k] for k in ("pass@1", "pass@2", "format", "mean_length")}
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"hydra.run.dir={run}_bad",
                          *args[:-3], "rl.eval_problems=96"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "rl.eval_problems=96" in bad.stderr and "rl.eval_difficulties" in bad.stderr
    assert not (tmp_path / "ev_bad" / "eval.json").exists()
