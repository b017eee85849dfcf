"""What resuming checks: a damaged latest checkpoint is named and passed over (and the run still
reproduces the uninterrupted losses), an explicit damaged one stops with exit 2, and a config that
differs from the checkpoint's is refused or accepted by rule."""
import os
import shutil

import pytest

from dsv3.config import ConfigError
from dsv3.config.schema import Config
from dsv3.train.resume import check_config_change, config_tree, validate_allow_changes
from tests.helpers import read_metrics, run_pretrain

ARGS = ["+experiment=moe_tiny", "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("finished") / "run")
    r = run_pretrain(run, *ARGS, "train.resume=none")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(finished, copy)
    return copy


def _ckpt(run: str, step: int) -> str:
    return os.path.join(run, "checkpoints", f"step_{step:08d}")


def _damage(path: str, how: str) -> str:
    """Truncate (size differs) or flip one byte (only the checksum differs) of the model's data file."""
    name = next(n for n in os.listdir(path) if n.endswith(".distcp"))
    data = os.path.join(path, name)
    if how == "truncate":
        os.truncate(data, os.path.getsize(data) // 2)
    else:
        with open(data, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)[0]
            f.seek(1000)
            f.write(bytes([byte ^ 0x40]))
    return name


def test_auto_resume_passes_over_a_damaged_latest_checkpoint(finished, run):
    name = _damage(_ckpt(run, 6), "flip")
    r = run_pretrain(run, *ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{_ckpt(run, 6)} is damaged: {name} has the right size but not the manifest's SHA-256" in r.stdout
    assert f"resumed from {_ckpt(run, 3)} at step 3" in r.stdout
    reference, records = read_metrics(finished), read_metrics(run)
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert [m["loss"] for m in records[6:]] == [m["loss"] for m in reference[3:]]  # bit for bit
    assert read_metrics(run)[-1]["val_loss"] == reference[-1]["val_loss"]


def test_an_explicit_damaged_checkpoint_exits_2_naming_the_file(run):
    """A flipped byte: seen when the ranks compare checksums, before the data or the model are built."""
    name = _damage(_ckpt(run, 3), "flip")
    r = run_pretrain(run, *ARGS, f"train.resume={_ckpt(run, 3)}", timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.resume" in lines[0] and f"is damaged: {name}" in lines[0], r.stderr
    assert len(read_metrics(run)) == 6  # no step ran


def test_validation_already_sees_a_truncated_explicit_checkpoint(run):
    from dsv3.config import validate

    name = _damage(_ckpt(run, 3), "truncate")
    cfg = Config()
    cfg.train.resume = _ckpt(run, 3)
    with pytest.raises(ConfigError, match=f"is damaged: {name} has"):
        validate(cfg)


def test_auto_refuses_when_every_checkpoint_is_damaged(run):
    from dsv3.train.resume import checkpoint_to_resume

    for step in (3, 6):
        _damage(_ckpt(run, step), "truncate")
    cfg = Config()
    cfg.checkpoint.dir = os.path.join(run, "checkpoints")
    with pytest.raises(ConfigError, match="every checkpoint in .* is damaged .*train.resume=none starts over"):
        checkpoint_to_resume(cfg)


def test_a_changed_config_is_refused_on_resume_in_one_line(run):
    r = run_pretrain(run, *ARGS, "train.max_steps=7", "optim.lr=0.01", timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.lr 0.003 -> 0.01" in lines[0], r.stderr
    assert "train.resume_allow_changes=[optim.lr]" in lines[0]


def _yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config_tree(cfg)))


def _changed(**changes) -> Config:
    cfg = Config()
    for name, value in changes.items():
        section, key = name.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.mark.parametrize("changes", [dict(train__max_steps=99, train__log_every=5, checkpoint__every=10),
                                     dict(parallel__pp=2, parallel__ep=2, kernels__grouped_gemm="reference"),
                                     dict(train__micro_batch_size=1, data__cache_dir="/elsewhere")])
def test_run_length_cadence_and_plan_may_change(changes):
    check_config_change(_yaml(Config()), _changed(**changes), "ckpt")


@pytest.mark.parametrize("changes,allow", [(dict(optim__lr=1.0), ["optim.lr"]), (dict(optim__lr=1.0), ["optim"]),
                                           (dict(train__seed=7, precision__dtype="bf16"), ["train.seed", "precision"])])
def test_other_changes_need_to_be_allowed(changes, allow):
    cfg = _changed(**changes)
    with pytest.raises(ConfigError) as err:
        check_config_change(_yaml(Config()), cfg, "ckpt")
    assert err.value.key == "train.resume_allow_changes"
    cfg.train.resume_allow_changes = allow
    check_config_change(_yaml(Config()), cfg, "ckpt")


@pytest.mark.parametrize("changes", [dict(model__n_layers=3), dict(model__vocab_size=1024),
                                     dict(data__seq_len=32), dict(data__source="shards")])
def test_model_shapes_and_data_never_change_even_when_allowed(changes):
    cfg = _changed(**changes)
    cfg.train.resume_allow_changes = ["model", "data"]
    with pytest.raises(ConfigError) as err:
        check_config_change(_yaml(Config()), cfg, "ckpt")
    assert err.value.key == "train.resume" and "cannot change when resuming" in err.value.allowed


def test_a_key_missing_from_an_older_config_counts_as_its_default():
    old = _yaml(Config()).replace("  on_nonfinite: skip\n", "").replace("  seed: 1234\n", "")
    check_config_change(old, Config(), "ckpt")
    with pytest.raises(ConfigError):
        check_config_change(old, _changed(train__seed=5), "ckpt")


@pytest.mark.parametrize("entries,why", [(["optim.learning_rate"], "no config key"),
                                         (["model.dim"], "can never change"), (["model"], "can never change")])
def test_allow_changes_must_name_changeable_keys(entries, why):
    with pytest.raises(ConfigError, match=why):
        validate_allow_changes(entries)
    validate_allow_changes(["optim", "train.seed", "model.rope_theta"])
