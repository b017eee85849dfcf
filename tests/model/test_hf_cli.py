"""The user's path through the command-line tools: train, export to HF, load model and tokenizer with
transformers offline and generate, import back, and start a new run from either the imported checkpoint
or the HF directory itself."""
import subprocess
import sys

import pytest
import torch
import yaml

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer
from dsv3.train.checkpoint import latest_checkpoint, load_checkpoint
from tests.helpers import ROOT, read_metrics, run_pretrain

transformers = pytest.importorskip("transformers")


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_export_load_import_and_restart(tmp_path):
    run = str(tmp_path / "run")
    r = run_pretrain(run, "+experiment=moe_tiny", "train.max_steps=2", "train.resume=none")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = latest_checkpoint(f"{run}/checkpoints")

    hf_dir = str(tmp_path / "hf")
    cli("launch/export_hf.py", f"{run}/checkpoints", hf_dir)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not info["missing_keys"] and all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    with open(f"{ckpt}/config.yaml") as f:
        cfg = ModelConfig(**yaml.safe_load(f)["model"])
    ours = Transformer(cfg)
    load_checkpoint(ckpt, ours, optimizer=None)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, ours.eval()(tokens), rtol=1e-5, atol=1e-5)

    # The run's tokenizer travels with the checkpoint: AutoTokenizer reads it, generate stops at its EOS.
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours_tok = Tokenizer.from_file(f"{ckpt}/tokenizer.json")
    text = "def main():\n    return 0\n"
    assert tok(text).input_ids == ours_tok.encode(text).ids and tok.decode(tok(text).input_ids) == text
    assert hf.generation_config.eos_token_id == tok.eos_token_id == ours_tok.token_to_id("<|endoftext|>")
    prompt = torch.tensor([tok("import os").input_ids])
    generated = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    greedy = prompt
    with torch.no_grad():  # greedy decoding with our model, the independent reference
        for _ in range(12):
            greedy = torch.cat([greedy, ours(greedy)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, greedy)

    imported = str(tmp_path / "imported")
    cli("launch/import_hf.py", hf_dir, imported)
    back = Transformer(cfg)
    load_checkpoint(imported, back, optimizer=None)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name  # MTP included: export wrote it, import read it back

    # A fresh run from either form starts from these weights: its first loss is the trained model's.
    first = {}
    for source in (imported, hf_dir):
        out = str(tmp_path / f"from_{len(first)}")
        r = run_pretrain(out, "+experiment=moe_tiny", "train.max_steps=1", "train.resume=none",
                         f"checkpoint.init_from={source}")
        assert r.returncode == 0, r.stderr[-3000:]
        first[source] = read_metrics(out)[0]["loss"]
    fresh = str(tmp_path / "fresh")
    assert run_pretrain(fresh, "+experiment=moe_tiny", "train.max_steps=1", "train.resume=none").returncode == 0
    assert first[imported] == first[hf_dir] != read_metrics(fresh)[0]["loss"]
