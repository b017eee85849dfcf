"""Write a Hugging Face DeepseekV3 directory (config.json, safetensors, tokenizer) from a dsv3 checkpoint.

    python launch/export_hf.py runs/moe_small/checkpoints/step_00000300 exported/ [--dtype bf16]
    python launch/export_hf.py runs/moe_small/checkpoints exported/     # its newest intact checkpoint

`transformers.AutoModelForCausalLM.from_pretrained(exported)`, `AutoTokenizer.from_pretrained(exported)`
and `generate` then work offline. The MTP modules are written as model.layers.{n_layers + k}.*
(DeepSeek's own layout), which HF's model does not use. The tokenizer is the one the checkpoint
carries (the run's tokenizer.json); --tokenizer gives another (a checkpoint of an older dsv3 has none).

Everything is checked before anything is written (exit 2 naming the problem); the directory is
written under a temporary name next to OUT_DIR and renamed at the end, so an error leaves nothing
half-written. An existing non-empty OUT_DIR is refused unless --overwrite.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.schema import ModelConfig  # noqa: E402
from dsv3.data.tokenizer import eos_id, load_tokenizer  # noqa: E402
from dsv3.model import Transformer  # noqa: E402
from dsv3.model.hf_format import export_problems, save_hf  # noqa: E402
from dsv3.train.checkpoint import (CheckpointError, checkpoints, describe_damage, load_checkpoint,  # noqa: E402
                                   verify_checkpoint)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(Exception):
    """What makes the export impossible, said before anything is written."""


def _checkpoint(given: str) -> str:
    """`given` itself, or the newest intact checkpoint of a checkpoint directory."""
    if os.path.isfile(os.path.join(given, "config.yaml")):
        problems = verify_checkpoint(given)
        if problems:
            raise ExportError(describe_damage(given, problems))
        return given
    found = checkpoints(given)
    if not found:
        raise ExportError(f"{given} is not a dsv3 checkpoint (no config.yaml) nor a directory of them")
    for path in found:
        problems = verify_checkpoint(path)
        if not problems:
            return path
        print(f"warning: {describe_damage(path, problems)}; trying the one before it", file=sys.stderr)
    raise ExportError(f"every checkpoint in {given} is damaged")


def _tokenizer_files(tokenizer_json: str, cfg: ModelConfig) -> tuple[dict[str, dict], int]:
    """The small JSON files that make `AutoTokenizer` and `generate` work, and the EOS id."""
    tok = load_tokenizer(tokenizer_json)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ExportError(f"{tokenizer_json} has {tok.get_vocab_size()} tokens, more than model.vocab_size="
                          f"{cfg.vocab_size}")
    eos = eos_id(tok)
    eos_token = tok.id_to_token(eos)
    # Documents are separated by EOS in training (dsv3.data.shards), so EOS also opens a sequence.
    return {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token,
                                  "bos_token": eos_token, "pad_token": eos_token, "add_bos_token": False,
                                  "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": {"eos_token": eos_token, "bos_token": eos_token, "pad_token": eos_token},
        "generation_config.json": {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos},
    }, eos


def export(checkpoint: str, out_dir: str, dtype: str = "fp32", tokenizer: str | None = None,
           overwrite: bool = False) -> str:
    """Check, then write `out_dir`; returns the checkpoint exported. Raises ExportError before writing."""
    path = _checkpoint(checkpoint)
    with open(os.path.join(path, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    cfg = dataclasses.replace(ModelConfig(), **saved["model"])
    problems = export_problems(cfg)
    if problems:
        raise ExportError(f"{path} cannot be written in HF's DeepseekV3 format: {'; '.join(problems)}")
    tokenizer = tokenizer or os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise ExportError(f"{path} carries no tokenizer.json (saved by an older dsv3): pass --tokenizer, e.g. the "
                          "tokenizer.json of the run's data directory")
    tok_files, eos = _tokenizer_files(tokenizer, cfg)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty: choose another directory or pass --overwrite")

    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = Transformer(cfg)
        load_checkpoint(path, model, optimizer=None)
        save_hf(tmp, cfg, model.state_dict(), dtype=DTYPES[dtype], bos_token_id=eos, eos_token_id=eos)
        shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))
        for name, content in tok_files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
        if os.path.exists(out_dir):  # --overwrite: the old one goes only once the new one is complete
            old = f"{out_dir}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a checkpoint dir (its newest intact step)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokenizer", help="a tokenizer.json to write instead of the checkpoint's own")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir (once the new one is written)")
    args = p.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir, args.dtype, args.tokenizer, args.overwrite)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
