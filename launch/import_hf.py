"""Turn a Hugging Face DeepseekV3 directory into a dsv3 checkpoint (weights only) and print the model config.

    python launch/import_hf.py hf_dir/ ckpt/
    torchrun ... launch/pretrain.py model=... checkpoint.init_from=ckpt/

(`checkpoint.init_from` also accepts the HF directory itself.) MTP layers present in the HF files
(model.layers.{n_layers + k}.*) are imported; without them the MTP depth is set to 0.
"""
import argparse
import dataclasses
import os
import shutil
import sys
import warnings

import torch.distributed.checkpoint as dcp
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.model import Transformer  # noqa: E402
from dsv3.model.hf_format import from_hf_state_dict, load_hf, model_config_from_hf  # noqa: E402
from dsv3.train.manifest import write_manifest  # noqa: E402

# DCP's note that it saves from a single process: it does.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        print(f"error: {args.hf_dir} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    hf_cfg, tensors = load_hf(args.hf_dir)
    if hf_cfg.get("model_type") != "deepseek_v3":
        print(f"error: {args.hf_dir} holds a {hf_cfg.get('model_type')!r} model; only deepseek_v3 is supported",
              file=sys.stderr)
        return 2
    cfg = model_config_from_hf(hf_cfg)
    if not any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in tensors):
        cfg = dataclasses.replace(cfg, mtp_depth=0)
    sd = from_hf_state_dict(cfg, tensors)
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=True)
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        print(f"error: {args.out_dir} exists and is not empty", file=sys.stderr)
        return 2
    # Written under a temporary name, with a manifest, and renamed: a checkpoint like the trainer's.
    out = os.path.abspath(args.out_dir)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dcp.save({"model": model.state_dict()}, checkpoint_id=tmp)
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        yaml.safe_dump({"model": dataclasses.asdict(cfg)}, f, sort_keys=False)
    if os.path.isfile(os.path.join(args.hf_dir, "tokenizer.json")):  # carried along for a later export
        shutil.copyfile(os.path.join(args.hf_dir, "tokenizer.json"), os.path.join(tmp, "tokenizer.json"))
    write_manifest(tmp)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    print(f"wrote {args.out_dir}; model config:")
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
