"""Sample completions from a checkpoint.

    python launch/generate.py runs/sft_small/checkpoints --prompt "What is 12 + 30?" --template r1 \\
        --temperature 0.7 --num-samples 4 [--speculative mtp] [--top-p 0.95] [--top-k 50]
    torchrun --nproc_per_node=2 launch/generate.py CKPT --prompts-file prompts.txt --num-samples 8

CKPT is a dsv3 checkpoint (a step directory, or a checkpoint directory: its latest step) or a Hugging
Face DeepseekV3 directory. The tokenizer is the one next to the checkpoint (SFT runs write it) or the
one its run trained with; --tokenizer overrides. --temperature 0 is greedy decoding. Under torchrun the
prompts are split over the ranks (data parallel) and the output is the single process's, sample for
sample. Invalid values exit with code 2 and one line naming them.
"""
import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--template", choices=["none", "r1"], default="none",
                   help="r1: wrap each prompt as a question in the R1 template (system prompt of the SFT run)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="G completions per prompt")
    p.add_argument("--speculative", choices=["mtp"], help="draft with the model's MTP module")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--attention", choices=["auto", "absorbed", "naive"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as in training")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--json", action="store_true", help="one JSON object per completion (tokens, logprobs, ...)")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load(args):
    """(model, tokenizer, system prompt of the SFT run or None)."""
    import torch
    import yaml

    from dsv3.data.tokenizer import load_tokenizer
    from dsv3.model import Transformer
    from dsv3.train.checkpoint import load_checkpoint
    from dsv3.train.weights import (checkpoint_step, is_hf_directory, load_initial_weights, model_config_of,
                                    tokenizer_path_of)

    try:
        path = checkpoint_step(args.checkpoint)
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_path_of(path))
    except FileNotFoundError as e:
        fail(str(e))
    cfg = model_config_of(path)
    model = Transformer(cfg)
    if is_hf_directory(path):
        load_initial_weights(path, model, cfg)
        system = None
    else:
        load_checkpoint(path, model, optimizer=None)
        with open(os.path.join(path, "config.yaml")) as f:
            system = (yaml.safe_load(f).get("sft") or {}).get("system_prompt")
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        fail(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {cfg.vocab_size}")
    return model.eval(), tokenizer, system, torch


def main(argv=None) -> int:
    args = parse_args(argv)
    from dsv3.generate import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, num_samples=args.num_samples, stop_strings=tuple(args.stop),
                            seed=args.seed, speculative=args.speculative)
    try:
        params.validate()
    except ValueError as e:  # "top_p=2.0: must be ..." -> "--top-p=2.0: must be ..."
        name, rest = str(e).split("=", 1)
        fail(f"--{name.replace('_', '-')}={rest}")
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        fail("no prompt given (--prompt TEXT or --prompts-file FILE)")

    model, tokenizer, system, torch = load(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.template == "r1":
        from dsv3.rl.template import R1_SYSTEM_PROMPT, r1_prompt

        prompts = [r1_prompt(p, R1_SYSTEM_PROMPT if system is None else system) for p in prompts]
    from dsv3.generate import Generator
    from dsv3.generate.data_parallel import generate_data_parallel
    from dsv3.parallel.mesh import init_env

    env = init_env(args.device)
    model = model.to(env.device)
    generator = Generator(model, tokenizer, attention=args.attention)
    # bf16 as in training: autocast over fp32 weights (norms, router, RoPE tables and sampling stay fp32)
    precision = (torch.autocast(env.device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                 else contextlib.nullcontext())
    try:
        with precision:
            result = generate_data_parallel(generator, prompts, params)
    except ValueError as e:  # prompts too long, no MTP module, ...
        fail(str(e))
    if env.rank == 0:
        for c in result.completions:
            if args.json:
                print(json.dumps({"prompt_index": c.prompt_index, "sample_index": c.sample_index, "text": c.text,
                                  "tokens": c.tokens, "logprobs": c.logprobs, "finish_reason": c.finish_reason}))
            else:
                print(f"=== prompt {c.prompt_index}, sample {c.sample_index} ({c.finish_reason}, "
                      f"{len(c.tokens)} tokens) ===\n{prompts[c.prompt_index]}{c.text}")
        s = result.stats
        line = f"{s['completion_tokens']} tokens in {s['seconds']:.2f}s ({s['tokens_per_s']:.1f} tokens/s)"
        if "acceptance_rate" in s:
            line += f", MTP draft acceptance {s['acceptance_rate']:.1%}"
        print(line, file=sys.stderr)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
