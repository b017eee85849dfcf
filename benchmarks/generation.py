"""Generation throughput, in one run on one machine: batched group sampling (G = 8, 16) with MLA's latent
cache vs without a cache (the full forward recomputed for every token) vs `transformers`' generate on
the exported model (HF's own DeepseekV3 with its per-head KV cache), and MTP self-speculative decoding
vs plain decoding (greedy and sampling) with the draft acceptance rate; plus cache bytes per token of
MLA's latent cache vs a standard multi-head cache.

    python benchmarks/generation.py --checkpoint runs/moe_small/checkpoints --out docs/generation.json

Every contender generates the same number of tokens (no early stop), so tokens/s compare directly.
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config.schema import ModelConfig  # noqa: E402
from dsv3.data.tokenizer import load_tokenizer  # noqa: E402
from dsv3.generate import Generator, SamplingParams, cache_bytes_per_token  # noqa: E402
from dsv3.generate.sampling import RowRandom, choose, row_seed  # noqa: E402
from dsv3.model import Transformer  # noqa: E402
from dsv3.train.checkpoint import load_checkpoint  # noqa: E402
from dsv3.train.weights import checkpoint_step, model_config_of, tokenizer_path_of  # noqa: E402

PROMPTS = ["import os\nimport sys\n\n\ndef main(", "class Parser:\n    def __init__(self, text):\n        self.",
           "    for i in range(len(items)):\n        if ", "def read_config(path):\n    \"\"\"Read the"]


@torch.no_grad()
def generate_without_cache(model, prompt_ids: list[int], G: int, params: SamplingParams) -> int:
    """The baseline: every step runs the full forward over the whole sequence (no KV cache)."""
    seq = torch.tensor([prompt_ids] * G)
    rng = RowRandom([row_seed(params.seed, 0, g) for g in range(G)], seq.device)
    for _ in range(params.max_new_tokens):
        token, _ = choose(model(seq)[:, -1].float(), params, rng)
        seq = torch.cat([seq, token[:, None]], dim=1)
    return G * params.max_new_tokens


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a dsv3 checkpoint whose MTP module was trained")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--groups", type=int, nargs="+", default=[8, 16])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default="docs/generation.json")
    p.add_argument("--plot", default="docs/img/generation_throughput.png", help="'' = no picture")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = checkpoint_step(args.checkpoint)
    cfg = model_config_of(path)
    model = Transformer(cfg).eval()
    load_checkpoint(path, model, optimizer=None)
    tok = load_tokenizer(tokenizer_path_of(path))
    prompts = [tok.encode(t).ids for t in PROMPTS]
    gen = Generator(model, tok)
    n = args.new_tokens
    results: dict = {"checkpoint": path, "new_tokens": n, "temperature": args.temperature, "threads": args.threads,
                     "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": []}

    hf = None
    if not args.skip_hf:
        import transformers

        from dsv3.model.hf_format import save_hf

        tmp = tempfile.mkdtemp()
        save_hf(tmp, cfg, model.state_dict())
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        results["transformers"] = transformers.__version__

    def row(name, G, seconds, tokens, **extra):
        r = {"contender": name, "G": G, "seconds": round(seconds, 3), "tokens": tokens,
             "tokens_per_s": round(tokens / seconds, 1), **extra}
        results["rows"].append(r)
        print(json.dumps(r), flush=True)

    for G in args.groups:
        sampling = SamplingParams(max_new_tokens=n, temperature=args.temperature, num_samples=G, seed=0,
                                  stop_token_ids=())
        prompt = prompts[0]
        row("dsv3, latent cache", G, timed(lambda: gen.generate([prompt], sampling), args.repeats), G * n)
        last: dict = {}

        def spec():
            last["r"] = gen.generate([prompt], dataclasses.replace(sampling, speculative="mtp"))
        row("dsv3, latent cache + MTP drafts", G, timed(spec, args.repeats), G * n,
            acceptance_rate=round(last["r"].stats["acceptance_rate"], 3))
        row("dsv3, no cache", G, timed(lambda: generate_without_cache(model, prompt, G, sampling), 1), G * n)
        if hf is not None:
            ids = torch.tensor([prompt])

            def hf_generate():
                with torch.no_grad():
                    hf.generate(ids, do_sample=True, temperature=args.temperature, top_k=0, max_new_tokens=n,
                                min_new_tokens=n, num_return_sequences=G, pad_token_id=0, eos_token_id=None)
            row("transformers generate (its KV cache)", G, timed(hf_generate, args.repeats), G * n)

    # greedy: speculative output equals plain output; acceptance over several prompts
    greedy = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
    last = {}

    def plain_greedy():
        last["plain"] = gen.generate(prompts, greedy)

    def spec_greedy():
        last["spec"] = gen.generate(prompts, dataclasses.replace(greedy, speculative="mtp"))
    t_plain, t_spec = timed(plain_greedy, args.repeats), timed(spec_greedy, args.repeats)
    same = [a.tokens for a in last["plain"].completions] == [b.tokens for b in last["spec"].completions]
    row("greedy, latent cache", len(prompts), t_plain, len(prompts) * n)
    row("greedy, latent cache + MTP drafts", len(prompts), t_spec, len(prompts) * n,
        acceptance_rate=round(last["spec"].stats["acceptance_rate"], 3), identical_to_plain=same)

    from omegaconf import OmegaConf
    v3 = ModelConfig(**OmegaConf.to_object(OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                       "model", "deepseek_v3_671b.yaml"))))
    results["cache_bytes_per_token_bf16"] = {"this model": cache_bytes_per_token(cfg), "DeepSeek-V3 671B":
                                             cache_bytes_per_token(v3)}
    print(json.dumps(results["cache_bytes_per_token_bf16"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: str) -> None:
    """Tokens/s per contender, one group of bars per G (sampling) and one for greedy decoding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    groups = sorted({(r["contender"].startswith("greedy"), r["G"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (greedy, G) in zip(axes[0], groups):
        sel = [r for r in rows if r["G"] == G and r["contender"].startswith("greedy") == greedy]
        names = [r["contender"].replace("greedy, ", "").replace(" (its KV cache)", "") for r in sel]
        bars = ax.barh(range(len(sel)), [r["tokens_per_s"] for r in sel], color="tab:blue")
        for b, r in zip(bars, sel):
            label = f"{r['tokens_per_s']:.0f}"
            if "acceptance_rate" in r:
                label += f"  (accept {r['acceptance_rate']:.0%})"
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, " " + label, va="center", fontsize=8)
        ax.set_yticks(range(len(sel)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("generated tokens/s")
        ax.set_title(f"greedy, {G} prompts" if greedy else f"sampling T={results['temperature']}, G={G}", fontsize=9)
        ax.set_xlim(0, max(r["tokens_per_s"] for r in sel) * 1.75)
    parts = results["checkpoint"].rstrip("/").split("/")
    fig.suptitle(f"{'/'.join(parts[-3:])}, {results['new_tokens']} new tokens, "
                 f"{results['threads']} CPU threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
