"""precision=fp8 in the config: the preset, the device rule (CPU emulates, CUDA below 8.9 is refused
naming precision.dtype and suggesting bf16), and the recipe's options."""
import pytest
import torch

from dsv3.config import ConfigError, validate
from dsv3.config.schema import Config
from tests.helpers import run_pretrain


def fp8_config(**fp8) -> Config:
    cfg = Config()
    cfg.precision.dtype = "fp8"
    for k, v in fp8.items():
        setattr(cfg.precision.fp8, k, v)
    return cfg


def fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")


def test_fp8_validates_on_cpu():
    validate(fp8_config())


@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (8, 6)])
def test_fp8_on_a_gpu_below_sm89_is_refused_naming_precision_dtype(monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    with pytest.raises(ConfigError) as err:
        validate(fp8_config())
    assert err.value.key == "precision.dtype"
    assert f"{capability[0]}.{capability[1]}" in str(err.value) and "use precision.dtype=bf16 (8.0+) or fp16" in str(err.value)


def test_fp8_on_cuda_without_a_gpu_is_the_train_device_rule():
    cfg = fp8_config()
    cfg.train.device = "cuda"
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "train.device"


@pytest.mark.parametrize("capability", [(8, 9), (9, 0)])
def test_fp8_on_ada_and_hopper_passes_the_device_rule(monkeypatch, capability):
    from dsv3.fp8.config_rules import fp8_rules

    fake_gpu(monkeypatch, capability)
    fp8_rules(fp8_config(), 1)  # (the kernels' own check would need triton to see a real GPU)


@pytest.mark.parametrize("fields,world,key,allowed", [
    (dict(pow2_scales=["attn_out", "activations"]), 1, "precision.fp8.pow2_scales", "['activations'] unknown"),
    (dict(amax_floor=0.0), 1, "precision.fp8.amax_floor", "finite number > 0"),
    # the default model has no query compression: wq, not wq_a
    (dict(high_precision=["layers.0.attn.wq_a"]), 1, "precision.fp8.high_precision", "match no FP8 linear"),
    (dict(pow2_scales=["attn_out"]), 2, "precision.fp8.pow2_scales", "must contain expert_in with parallel.ep > 1"),
    (dict(amax_floor=1e-3), 2, "precision.fp8.amax_floor", "must be 0.0001 with parallel.ep > 1"),
])
def test_fp8_options_are_checked(fields, world, key, allowed):
    cfg = fp8_config(**fields)
    cfg.parallel.ep = world
    cfg.train.micro_batch_size = 1
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert err.value.key == key and allowed in str(err.value), str(err.value)


def test_fp8_needs_an_fp8_capable_grouped_gemm():
    cfg = fp8_config()
    cfg.kernels.grouped_gemm = "torch"  # torch._grouped_mm has no FP8
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "kernels.grouped_gemm" and "'auto', 'triton', 'reference'" in str(err.value)


def test_fp8_preset_sets_the_recipe_and_bf16_moments_and_bad_options_exit_2(tmp_path):
    from hydra import compose, initialize_config_dir

    from dsv3.config.store import register, to_config
    from tests.helpers import ROOT

    register()
    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        cfg = to_config(compose("config", overrides=["precision=fp8", "checkpoint.dir=x"]))
        plain = to_config(compose("config", overrides=["checkpoint.dir=x"]))
    assert cfg.precision.dtype == "fp8" and cfg.optim.moment_dtype == "bf16"
    assert cfg.precision.fp8.pow2_scales == ["attn_out", "expert_in", "expert_out_grad"]
    assert plain.precision.dtype == "fp32" and plain.optim.moment_dtype == "fp32"
    r = run_pretrain(str(tmp_path / "run"), "+experiment=moe_tiny", "precision=fp8",
                     "precision.fp8.pow2_scales=[attn_out,bogus]", timeout=120)
    assert r.returncode == 2 and "precision.fp8.pow2_scales" in r.stderr, r.stderr
