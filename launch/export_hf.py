"""Write a Hugging Face DeepseekV3 directory (config.json + safetensors) from a dsv3 checkpoint.

    python launch/export_hf.py runs/moe_small/checkpoints/step_00000300 exported/ [--dtype bf16]

`transformers.AutoModelForCausalLM.from_pretrained(exported)` then loads it offline. The MTP modules are
written as model.layers.{n_layers + k}.* (DeepSeek's own layout), which HF's model does not use.
If the checkpoint directory has a tokenizer next to its run's data, pass --tokenizer to copy it along.
"""
import argparse
import dataclasses
import os
import shutil
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.schema import ModelConfig  # noqa: E402
from dsv3.model import Transformer  # noqa: E402
from dsv3.model.hf_format import save_hf  # noqa: E402
from dsv3.train.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a checkpoint dir (its latest step is used)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokenizer", help="tokenizer.json to copy into out_dir")
    args = p.parse_args(argv)

    path = args.checkpoint
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        path = latest_checkpoint(path) or path
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        print(f"error: {args.checkpoint} is not a dsv3 checkpoint (no config.yaml)", file=sys.stderr)
        return 2
    with open(os.path.join(path, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    cfg = dataclasses.replace(ModelConfig(), **saved["model"])
    model = Transformer(cfg)
    load_checkpoint(path, model, optimizer=None)
    save_hf(args.out_dir, cfg, model.state_dict(), dtype=DTYPES[args.dtype])
    if args.tokenizer:
        shutil.copy(args.tokenizer, os.path.join(args.out_dir, "tokenizer.json"))
    print(f"wrote {args.out_dir} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
