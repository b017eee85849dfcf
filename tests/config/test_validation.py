"""Every invalid configuration exits with code 2 and one line naming the key, before any work is done."""
import os
import re

import pytest

from tests.helpers import run_pretrain, run_torchrun

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
    "overlap_without_experts": (["parallel.overlap=true"], "parallel.overlap"),
    "unknown_ep_transport": (["parallel.ep_transport=nvlink"], "parallel.ep_transport"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_naming_the_key(case, tmp_path):
    overrides, key = BAD[case]
    r = run_pretrain(str(tmp_path / "run"), "+experiment=moe_tiny", *overrides, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # no work was done


def test_under_torchrun_the_error_is_printed_once_and_the_workers_exit_2(tmp_path):
    r = run_torchrun(2, str(tmp_path / "run"), "+experiment=moe_tiny", "model.n_activated_experts=999", timeout=120)
    assert r.returncode != 0  # torchrun's own code is 1 whatever its workers' codes are
    assert (r.stdout + r.stderr).count("invalid config: model.n_activated_experts=999") == 1, r.stderr
    assert re.search(r"exitcode\s*:\s*2 ", r.stderr), r.stderr  # torchrun's summary of the first failure


def test_pipeline_config_inconsistent_with_the_batch_exits_2_on_every_rank(tmp_path):
    """As one rank of a torchrun world of 4 (WORLD_SIZE is all validation reads): pp=2 leaves dp=2, so
    8 / (4 * 2) = 1 micro-batch per step, not the 4 asked for; the rank stops before joining the group."""
    r = run_pretrain(str(tmp_path / "run"), "+experiment=moe_tiny", "parallel=pp2", "parallel.microbatches=4",
                     timeout=120, env={"WORLD_SIZE": "4", "RANK": "3"})
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "parallel.microbatches=4" in lines[0] and "= 1" in lines[0], r.stderr


def test_direct_ep_transport_across_nodes_exits_2_naming_the_key(tmp_path):
    """As one rank of a torchrun world of 4 ranks on 2 nodes of 2: an EP group of 4 would span both nodes,
    where no rank can map another's memory."""
    r = run_pretrain(str(tmp_path / "run"), "+experiment=moe_tiny", "parallel=ep4", "parallel.ep_transport=direct",
                     timeout=120, env={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "1"})
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "parallel.ep_transport" in lines[0] and "inside one node" in lines[0], r.stderr


@pytest.mark.parametrize("world,local,ep,transport,ok", [
    (4, 4, 4, "direct", True), (8, 4, 2, "direct", True), (8, 4, 8, "direct", False), (8, 6, 4, "direct", False),
    (8, 2, 4, "auto", True), (8, 2, 4, "all_to_all", True), (2, 1, 1, "direct", True),  # ep=1: nothing to move
])
def test_direct_ep_transport_needs_every_ep_group_inside_a_node(world, local, ep, transport, ok):
    from dsv3.config import ConfigError, validate

    cfg = _config({"parallel.ep": ep, "parallel.ep_transport": transport, "train.micro_batch_size": 1})
    if ok:
        validate(cfg, world_size=world, local_world_size=local)
    else:
        with pytest.raises(ConfigError) as err:
            validate(cfg, world_size=world, local_world_size=local)
        assert err.value.key == "parallel.ep_transport" and f"a node runs {local} ranks" in str(err.value)


def test_auto_ep_transport_is_direct_exactly_when_ep_groups_lie_inside_nodes():
    from dsv3.parallel.ep_transport import resolve_transport

    assert resolve_transport("auto", 4, 8)[0] == "direct"
    assert resolve_transport("auto", 4, 4)[0] == "direct"
    assert resolve_transport("auto", 8, 4)[0] == "all_to_all"
    assert resolve_transport("auto", 4, 6)[0] == "all_to_all"
    assert resolve_transport("all_to_all", 4, 8)[0] == "all_to_all"


def _config(overrides: dict):
    from dsv3.config.schema import Config

    cfg = Config()
    for name, value in overrides.items():
        section, field = name.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


PIPELINE = {"model.n_layers": 4, "train.global_batch_size": 8, "train.micro_batch_size": 1}


@pytest.mark.parametrize("world,overrides,key,allowed", [
    (2, {"parallel.pp": 2, "parallel.pp_schedule": "gpipe"}, "parallel.pp_schedule", "must be one of 1f1b, zb1p"),
    (3, {"parallel.pp": 3, "parallel.pp_schedule": "dualpipe"}, "parallel.pp", "dualpipe needs an even pp"),
    # too few micro-batches, given or derived from the batch sizes
    (4, {"parallel.pp": 4, "parallel.pp_schedule": "dualpipe", "parallel.microbatches": 4}, "parallel.microbatches",
     "needs an even number >= 2*pp = 8"),
    (2, {"parallel.pp": 2, "parallel.pp_schedule": "dualpipev", "train.micro_batch_size": 4},
     "parallel.microbatches", "needs >= 2*pp = 4; derived as train.global_batch_size / (train.micro_batch_size * "
                              "dp) = 8 / (4 * 1) = 2"),
    (8, {"parallel.pp": 8}, "parallel.pp", "makes 8 stages but the model has 4 layers"),
    (4, {"parallel.pp": 4, "parallel.pp_schedule": "dualpipev"}, "parallel.pp", "makes 8 stages but the model has 4"),
    (4, {"parallel.pp": 2, "parallel.microbatches": 8}, "parallel.microbatches",
     "must equal train.global_batch_size / (train.micro_batch_size * dp) = 8 / (1 * 2) = 4"),
    (4, {"parallel.pp": 3}, "parallel.pp", "must divide the world size (4)"),
    # expert parallelism inside the stages: EP groups are made of each stage's dp ranks
    (4, {"parallel.pp": 2, "parallel.ep": 4}, "parallel.ep",
     "must divide the data-parallel size (2 = world size / parallel.pp)"),
    (12, {"parallel.pp": 2, "parallel.ep": 3, "train.global_batch_size": 24}, "parallel.ep",
     "must divide model.n_routed_experts (8)"),
    (12, {"parallel.pp": 2, "parallel.ep": 3, "model.n_routed_experts": 6, "model.n_activated_experts": 1,
          "model.n_expert_groups": 2,
          "train.global_batch_size": 24}, "model.n_expert_groups", "must be a multiple or a divisor of parallel.ep (3)"),
    (4, {"parallel.pp": 2, "parallel.ep": 2, "parallel.overlap": True}, "parallel.overlap",
     "true needs F&B pairs"),
    (2, {"parallel.pp": 2, "parallel.pp_schedule": "dualpipe", "parallel.overlap": True}, "parallel.overlap",
     "needs expert parallelism"),
    (2, {"parallel.pp": 2, "train.batch_ramp_start": 4, "train.batch_ramp_samples": 64}, "train.batch_ramp_start",
     "must be 0 with parallel.pp > 1"),
    (1, {"parallel.microbatches": 0}, "parallel.microbatches", "must be >= 1, or -1"),
])
def test_pipeline_rules_name_the_key(world, overrides, key, allowed):
    from dsv3.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(_config({**PIPELINE, **overrides}), world_size=world)
    assert err.value.key == key and allowed in str(err.value), str(err.value)


@pytest.mark.parametrize("world,overrides", [
    (2, {"parallel.pp": 2}), (4, {"parallel.pp": 2, "parallel.pp_schedule": "dualpipev"}),  # dp=2: m=4
    (4, {"parallel.pp": 4, "parallel.pp_schedule": "dualpipe", "parallel.microbatches": 8}),
    (3, {"parallel.pp": 3, "parallel.pp_schedule": "zb1p", "model.n_layers": 3}),
    (1, {"parallel.microbatches": 8}),  # pp=1: the accumulation steps, checked too
    *[(4, {"parallel.pp": 2, "parallel.ep": 2, "parallel.pp_schedule": s}) for s in ("1f1b", "zb1p", "dualpipe",
                                                                                       "dualpipev")],
    (4, {"parallel.pp": 2, "parallel.ep": 2, "parallel.pp_schedule": "dualpipev", "parallel.overlap": False}),
])
def test_pipeline_layouts_that_fit_pass(world, overrides):
    from dsv3.config import validate

    validate(_config({**PIPELINE, **overrides}), world_size=world)


def test_valid_config_passes_validation():
    from dsv3.config import validate
    from dsv3.config.schema import Config

    validate(Config())


@pytest.mark.parametrize("world,overrides,key,allowed", [
    (4, {"parallel.ep": 3}, "parallel.ep", "must divide model.n_routed_experts (8)"),
    (6, {"parallel.ep": 4}, "parallel.ep", "must divide the data-parallel size (6 "),
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


def test_the_data_vocabulary_must_fit_the_model():
    """What the data loader used to find out after the run had started is a config error now."""
    import json
    import tempfile

    from dsv3.config import ConfigError, validate
    from dsv3.config.schema import Config

    with tempfile.TemporaryDirectory() as shards:
        with open(os.path.join(shards, "meta.json"), "w") as f:
            json.dump({"vocab_size": 1000}, f)
        cfg = Config()
        cfg.data.source, cfg.data.path = "shards", shards
        with pytest.raises(ConfigError, match=r"model.vocab_size=512: must be >= the 1000 tokens of the tokenizer"):
            validate(cfg)
        cfg.model.vocab_size = 1024
        validate(cfg)
        with open(os.path.join(shards, "meta.json"), "w") as f:  # a corpus too short for one sample
            json.dump({"vocab_size": 1000, "splits": {"train": [{"tokens": 64}], "val": [{"tokens": 500}]}}, f)
        with pytest.raises(ConfigError, match="data.seq_len=128: must be < the 64 tokens of the train split"):
            validate(cfg)
    cfg = Config()
    cfg.model.vocab_size = 200  # the embedded corpus' BPE is trained with model.vocab_size entries
    with pytest.raises(ConfigError, match="model.vocab_size=200: must be >= 261"):
        validate(cfg)


def test_init_from_weights_of_another_architecture_is_a_config_error(tmp_path):
    import dataclasses

    import yaml

    from dsv3.config import ConfigError, validate
    from dsv3.config.schema import Config, ModelConfig
    from dsv3.model import Transformer
    from dsv3.model.hf_format import save_hf
    from dsv3.train.manifest import write_manifest

    other = ModelConfig(dim=32)
    dsv3_dir, hf_dir = tmp_path / "dsv3", tmp_path / "hf"
    dsv3_dir.mkdir()
    (dsv3_dir / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(other)}))
    write_manifest(str(dsv3_dir))
    save_hf(str(hf_dir), other, Transformer(other).state_dict())
    for source in (dsv3_dir, hf_dir):
        cfg = Config()
        cfg.checkpoint.init_from = str(source)
        with pytest.raises(ConfigError, match="holds weights of another architecture: model.dim 64 vs 32"):
            validate(cfg)
    (hf_dir / "model.safetensors").unlink()
    cfg.model.dim = 32
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        validate(cfg)


@pytest.mark.parametrize("world,overrides,key,allowed", [
    (1, {"parallel.zero": 3}, "parallel.zero", "must be 0 (no sharding), 1 (optimizer state sharded) or 2"),
    (4, {"parallel.pp": 2, "parallel.zero": 2}, "parallel.zero", "2 is not supported with pipeline parallelism"),
    (1, {"parallel.offload_optimizer": True, "optim.moment_dtype": "bf16"}, "optim.moment_dtype",
     "must be fp32 with parallel.offload_optimizer=true"),
    (1, {"train.activation_checkpointing": "mlp"}, "train.activation_checkpointing",
     "must be one of none, full, moe, attention"),
    (2, {"parallel.ep": 2, "train.activation_checkpointing": "moe"}, "train.activation_checkpointing",
     "cannot run inside the F&B pairs"),
    (1, {"parallel.zero": 1, "precision.dtype": "fp16"}, "parallel.zero", "is not supported with precision.dtype=fp16"),
])
def test_zero_and_recompute_rules_name_the_key(world, overrides, key, allowed):
    from dsv3.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(_config({**PIPELINE, **overrides}), world_size=world)
    assert err.value.key == key and allowed in str(err.value), str(err.value)


@pytest.mark.parametrize("world,overrides", [
    (4, {"parallel.pp": 2, "parallel.zero": 1, "train.activation_checkpointing": "full"}),
    (2, {"parallel.ep": 2, "parallel.zero": 2, "parallel.overlap": False, "train.activation_checkpointing": "moe"}),
    (2, {"parallel.ep": 2, "train.activation_checkpointing": "attention", "optim.moment_dtype": "bf16",
         "parallel.zero": 1}),
])
def test_zero_and_recompute_combinations_that_work_pass(world, overrides):
    from dsv3.config import validate

    validate(_config({**PIPELINE, **overrides}), world_size=world)


def test_offload_without_a_buildable_cpu_adam_exits_2(monkeypatch):
    from dsv3.config import ConfigError, validate
    from dsv3.parallel import zero

    monkeypatch.setattr(zero, "cpu_adam_available", lambda: "no compiler (test)")
    with pytest.raises(ConfigError) as err:
        validate(_config({"parallel.offload_optimizer": True}), world_size=1)
    assert err.value.key == "parallel.offload_optimizer" and "no compiler (test)" in str(err.value)
