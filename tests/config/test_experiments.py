"""Every shipped experiment composes and passes validation at the world size it is written for, so a
preset that cannot run here (a GPU card, a cluster) still cannot drift out of the schema or its rules."""
import os

import pytest
from hydra import compose, initialize_config_dir

from dsv3.config import ConfigError
from dsv3.config.store import register, to_config
from dsv3.config.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(f"{ROOT}/configs/experiment") if f.endswith(".yaml"))
WORLD_SIZE: dict[str, int] = {}  # presets without hardware.* that need more than one rank


def compose_experiment(name: str, *overrides: str):
    register()
    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        return to_config(compose("config", overrides=[f"+experiment={name}", "checkpoint.dir=x", *overrides]))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_validates(name, tmp_path):
    cfg = compose_experiment(name)
    if cfg.data.source == "shards":  # the user's corpus: any directory prepare_data.py wrote
        (tmp_path / "meta.json").write_text(f'{{"vocab_size": {cfg.model.vocab_size}}}')
        cfg.data.path = str(tmp_path)
    if cfg.checkpoint.init_from is not None:   # a later phase: the previous phase's weights are not here
        cfg.checkpoint.init_from = None
    if cfg.sft.source == "jsonl":  # distillation: the traces a rejection-sampling run writes
        (tmp_path / "traces.jsonl").write_text('{"prompt": "What is 1 + 1?", "completion": " 2"}\n')
        cfg.sft.path = str(tmp_path / "traces.jsonl")
    hw = cfg.hardware
    validate(cfg, world_size=hw.nodes * hw.gpus_per_node if hw.name else WORLD_SIZE.get(name, 1))
    assert cfg.run_name == name


def test_the_expected_presets_are_shipped():
    assert {"moe_tiny", "moe_small", "rtx_card", "cluster_16b"} <= set(EXPERIMENTS)


def test_cluster_16b_splits_experts_within_a_node():
    cfg = compose_experiment("cluster_16b")
    assert (cfg.parallel.ep, cfg.precision.dtype, cfg.model.n_routed_experts) == (8, "fp8", 64)
    assert cfg.train.global_batch_size * cfg.data.seq_len == 1024 * 4096


def test_v3_production_layout_validates_for_2048_ranks():
    """PP16 x EP64 with DualPipe and ZeRO-1 on 2048 GPUs (V3 report §3.2): 128 dp ranks per stage, in EP groups of 64;
    120 micro-batches of one sequence per dp rank (15360 sequences, no ramp)."""
    cfg = compose_experiment("moe_tiny", "model=deepseek_v3_671b", "parallel=v3_pp16_ep64", "data.seq_len=4096",
                             "train.global_batch_size=15360", "train.micro_batch_size=1")
    validate(cfg, world_size=2048)
    assert (cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.pp_schedule, cfg.parallel.zero) == (16, 64, "dualpipe", 1)
    cfg.parallel.ep = 128
    with pytest.raises(ConfigError, match="parallel.ep=128"):   # 1024 ranks leave 64 dp ranks per stage
        validate(cfg, world_size=1024)


@pytest.mark.parametrize("preset", ["pp2_ep2_dualpipe", "pp2_ep2_1f1b"])
def test_composed_presets_validate_on_4_ranks(preset):
    cfg = compose_experiment("moe_tiny", f"parallel={preset}", "train.micro_batch_size=1")
    validate(cfg, world_size=4)
    assert (cfg.parallel.pp, cfg.parallel.ep) == (2, 2)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_rtx_card_offloads_the_optimizer(precision):
    """One 24 GB card: the optimizer in host memory (CPU Adam needs fp32 moments, also under FP8's
    preset, which would set bf16); micro-batches of 4 fit without recomputation (the planner sizes it,
    tests/planner/test_presets.py)."""
    cfg = compose_experiment("rtx_card", f"precision={precision}")
    validate(cfg, world_size=1)
    assert cfg.parallel.offload_optimizer and cfg.optim.moment_dtype == "fp32"
    assert cfg.train.activation_checkpointing == "none" and cfg.precision.dtype == precision
