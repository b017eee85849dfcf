"""Every shipped experiment composes and passes validation at the world size it is written for, so a
preset that cannot run here (a GPU card, a cluster) still cannot drift out of the schema or its rules."""
import os

import pytest
from hydra import compose, initialize_config_dir

from dsv3.config.store import register, to_config
from dsv3.config.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(f"{ROOT}/configs/experiment") if f.endswith(".yaml"))
WORLD_SIZE = {"cluster_16b": 64}  # 8 nodes of 8 GPUs, as its header says


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
    validate(cfg, world_size=WORLD_SIZE.get(name, 1))
    assert cfg.run_name == name


def test_the_expected_presets_are_shipped():
    assert {"moe_tiny", "moe_small", "rtx_card", "cluster_16b"} <= set(EXPERIMENTS)


def test_cluster_16b_splits_experts_within_a_node():
    cfg = compose_experiment("cluster_16b")
    assert (cfg.parallel.ep, cfg.precision.dtype, cfg.model.n_routed_experts) == (8, "fp8", 64)
    assert cfg.train.global_batch_size * cfg.data.seq_len == 1024 * 4096
