"""Generation under data parallelism: each rank samples a share of the prompts with the whole model.

Prompt i goes to rank i mod world and its rows are seeded by the global index i, so the samples are
those a single process draws, whatever the number of ranks. Expert and pipeline parallelism would
need every rank in every forward (lock-step decoding); they are not supported for generation yet.
"""
import torch.distributed as dist

from dsv3.generate.generator import GenerationResult, Generator
from dsv3.generate.sampling import SamplingParams


def generate_data_parallel(generator: Generator, prompts: list, params: SamplingParams,
                           gather: bool = True) -> GenerationResult:
    """This rank's share of `prompts` (all of them without a process group). gather=True: every rank
    returns all completions in prompt order (stats summed over ranks, seconds the slowest rank's);
    False: only its own, with `prompt_index` still global."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = list(range(rank, len(prompts), world))
    if mine:
        result = generator.generate([prompts[i] for i in mine], params, prompt_ids=mine)
        for c in result.completions:
            c.prompt_index = mine[c.prompt_index]
    else:
        result = GenerationResult([], {"completion_tokens": 0, "seconds": 0.0})
    if world == 1 or not gather:
        return result
    shares: list = [None] * world
    dist.all_gather_object(shares, (result.completions, result.stats))
    completions = sorted((c for share, _ in shares for c in share), key=lambda c: (c.prompt_index, c.sample_index))
    stats: dict = {}
    for _, s in shares:
        for k, v in s.items():
            if isinstance(v, (int, float)) and k not in ("tokens_per_s", "acceptance_rate"):
                stats[k] = max(stats.get(k, 0), v) if k == "seconds" else stats.get(k, 0) + v
    stats["tokens_per_s"] = stats.get("completion_tokens", 0) / max(stats.get("seconds", 0), 1e-9)
    if "drafts" in stats and params.speculative:
        stats["acceptance_rate"] = stats["accepted"] / max(stats["drafts"], 1)
    return GenerationResult(completions, stats)
