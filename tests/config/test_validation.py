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
    "batch_not_divisible": (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size"),
    "dense_layers_beyond_layers": (["model.n_dense_layers=9"], "model.n_dense_layers"),
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
