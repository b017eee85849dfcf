"""Every invalid configuration exits with code 2 and one line naming the key, before any work is done."""
import os

import pytest

from tests.helpers import run_pretrain

BAD = {
    "too_many_activated_experts": (["model.n_activated_experts=999"], "model.n_activated_experts"),
    "more_limited_groups_than_groups": (["model.n_limited_groups=3", "model.n_expert_groups=2"], "model.n_limited_groups"),
    "experts_not_divisible_into_groups": (["model.n_expert_groups=3"], "model.n_expert_groups"),
    "seq_len_beyond_rope_tables": (["data.seq_len=512", "model.max_seq_len=256"], "data.seq_len"),
    "max_seq_len_beyond_yarn": (["model.max_seq_len=200000", "model.original_seq_len=4096", "model.rope_factor=40",
                                 "data.seq_len=64"], "model.max_seq_len"),
    "missing_data_path": (["data=shards", "data.path=/nonexistent/corpus"], "data.path"),
    "unknown_precision": (["precision.dtype=fp4"], "precision.dtype"),
    "unknown_grouped_gemm": (["kernels.grouped_gemm=cublas"], "kernels.grouped_gemm"),
    "triton_on_a_cpu": (["kernels.grouped_gemm=triton", "train.device=cpu"], "kernels.grouped_gemm"),
    "batch_not_divisible": (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size"),
    "dense_layers_beyond_layers": (["model.n_dense_layers=9"], "model.n_dense_layers"),
    "ep_not_dividing_experts": (["parallel.ep=3"], "parallel.ep"),
    "ep_beyond_one_process": (["parallel.ep=2"], "parallel.ep"),
    "expert_align_zero": (["parallel.expert_align=0"], "parallel.expert_align"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_naming_the_key(case, tmp_path):
    overrides, key = BAD[case]
    r = run_pretrain(str(tmp_path / "run"), "+experiment=moe_tiny", *overrides, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # no work was done


def test_valid_config_passes_validation():
    from dsv3.config import validate
    from dsv3.config.schema import Config

    validate(Config())


@pytest.mark.parametrize("world,overrides,key,allowed", [
    (4, {"parallel.ep": 3}, "parallel.ep", "must divide model.n_routed_experts (8)"),
    (6, {"parallel.ep": 4}, "parallel.ep", "must divide the data-parallel size (6)"),
    (6, {"parallel.ep": 3, "model.n_expert_groups": 2, "model.n_routed_experts": 6, "model.n_activated_experts": 1},
     "model.n_expert_groups", "must be a multiple or a divisor of parallel.ep (3)"),
])
def test_expert_parallel_rules_name_the_key(world, overrides, key, allowed):
    """Rules that need a world size > 1, checked directly (a subprocess would have to start the ranks)."""
    from dsv3.config import ConfigError, validate
    from dsv3.config.schema import Config

    cfg = Config()
    for name, value in overrides.items():
        section, field = name.split(".")
        setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert err.value.key == key and allowed in str(err.value), str(err.value)


@pytest.mark.parametrize("world,ep,groups", [(2, 2, 1), (4, 2, 4), (4, 4, 2), (8, 4, 4)])
def test_expert_parallel_layouts_that_align_pass(world, ep, groups):
    from dsv3.config import validate
    from dsv3.config.schema import Config

    cfg = Config()
    cfg.parallel.ep, cfg.model.n_expert_groups = ep, groups
    cfg.train.micro_batch_size = 1
    validate(cfg, world_size=world)
