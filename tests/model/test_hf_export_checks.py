"""launch/export_hf.py checks everything before it writes, and writes nothing half-way: a config HF
cannot represent, a damaged checkpoint, a missing tokenizer or an occupied output directory end with
exit code 2 and no output directory."""
import dataclasses
import importlib.util
import os

import pytest
import yaml

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.train.checkpoint import save_checkpoint
from dsv3.train.optim import AdamW
from tests.helpers import ROOT

pytest.importorskip("safetensors")


def _export_main():
    spec = importlib.util.spec_from_file_location("export_hf", os.path.join(ROOT, "launch", "export_hf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _checkpoint(root, **model) -> str:
    from dsv3.data.tokenizer import train_bpe

    cfg = ModelConfig(n_layers=2, **model)
    m = Transformer(cfg)
    init_weights(m, 0, 0.02)
    tok = train_bpe(["def f(x):\n    return x\n"] * 4, 300)
    tok.save(str(root / "tokenizer.json"))
    return save_checkpoint(str(root / "ckpts"), 1, m, AdamW(m.parameters(), lr=1e-3), {"step": 1, "consumed_samples": 0},
                           yaml.safe_dump({"model": dataclasses.asdict(cfg)}), tokenizer=str(root / "tokenizer.json"))


def test_export_writes_a_complete_directory_and_refuses_to_overwrite(tmp_path, capsys):
    main, ckpt = _export_main(), _checkpoint(tmp_path)
    out = str(tmp_path / "hf")
    assert main([ckpt, out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert main([ckpt, out]) == 2 and "exists and is not empty" in capsys.readouterr().err
    assert main([ckpt, out, "--overwrite", "--dtype", "bf16"]) == 0
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]  # no debris


@pytest.mark.parametrize("problem,message", [
    ("softmax", "cannot be written in HF's DeepseekV3 format: model.score_func='softmax'"),
    ("damaged", "is damaged: rng_rank0.pt has 3 bytes"),
    ("no_tokenizer", "carries no tokenizer.json"),
])
def test_export_refuses_before_writing_anything(problem, message, tmp_path, capsys):
    main = _export_main()
    ckpt = _checkpoint(tmp_path, score_func="softmax" if problem == "softmax" else "sigmoid")
    if problem == "damaged":
        os.truncate(os.path.join(ckpt, "rng_rank0.pt"), 3)
    if problem == "no_tokenizer":  # a checkpoint of an older dsv3
        os.remove(os.path.join(ckpt, "tokenizer.json"))
        os.remove(os.path.join(ckpt, "manifest.json"))
    out = str(tmp_path / "hf")
    assert main([ckpt, out]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith("hf")]


def test_a_failure_while_writing_leaves_no_output_directory(tmp_path, monkeypatch):
    main, ckpt = _export_main(), _checkpoint(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError):
        main([ckpt, str(tmp_path / "hf")])
    assert not [n for n in os.listdir(tmp_path) if n.startswith("hf")]
