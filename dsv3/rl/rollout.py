"""A GRPO batch: groups of G completions per training prompt from the current policy, their rule
rewards, DAPO's dynamic sampling, and the tensors the training forward takes.

Prompts come from a fixed pool of training problems visited in a seeded order (`PromptStream`), so the
run's position is the number of prompts drawn: resuming, or splitting the sampling over ranks, draws
the same prompts. Every sampling round has its own seed (from the run's seed and its first prompt's
position), and each row's generator is seeded by (that seed, prompt, sample): the samples do not depend
on the plan either.
"""
import hashlib
import time
from dataclasses import dataclass, field

import torch

from dsv3.config.post_training import TaskConfig
from dsv3.data.dataset import GlobalSampler
from dsv3.generate import Completion, Generator, SamplingParams
from dsv3.generate.data_parallel import generate_data_parallel
from dsv3.rl.grpo_loss import zero_std_groups
from dsv3.rl.rewards import Rollout, WeightedReward, accuracy
from dsv3.rl.tasks import Problem, mixture
from dsv3.rl.template import r1_prompt


class PromptStream:
    """Global prompt position -> training problem: epoch by epoch through a seeded permutation of the pool."""

    def __init__(self, tasks: TaskConfig, pool_size: int, seed: int):
        self.problems = mixture(tasks.families, tasks.difficulties, "train", pool_size, tasks.seed,
                                tasks.held_out_fraction)
        self.sampler = GlobalSampler(len(self.problems), seed)

    def __call__(self, first: int, count: int) -> list[Problem]:
        return [self.problems[i] for i in self.sampler(first, count)]

    def __len__(self) -> int:
        return len(self.problems)

    def report(self, before: int, after: int, step: int) -> dict:
        return {"data/epoch/prompts": after / len(self)}

    def describe(self) -> str:
        fams = sorted({p.family for p in self.problems})
        levels = sorted({p.difficulty for p in self.problems})
        return f"{len(self)} training problems ({', '.join(fams)}; difficulty {levels})"


def round_seed(seed: int, first_prompt: int) -> int:
    digest = hashlib.sha256(f"grpo/{seed}/{first_prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Batch:
    """The groups kept for training, group-major (completions[i * G + g]), and what was sampled in all."""

    problems: list[Problem] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def tensors(self, pad_id: int, mask_truncated: bool) -> dict[str, torch.Tensor]:
        """Each sample as one row of the training forward: inputs = (prompt + completion)[:-1], right-padded
        to the batch's longest (the same width whatever the plan, so that padding routes alike too).
        Returns inputs and targets [N, S]; mask [N, S] (the targets that are completion tokens and count);
        completion [N, S] (the targets that are completion tokens); sampler_logp [N, S] (the generator's
        log-probabilities there); truncated [N]; length [N] (real input positions); with recorded routing,
        routing [N, S, MoE layers, K] (the sampler's experts of each input position, -1 on padding)."""
        rows = [c.prompt_tokens + c.tokens for c in self.completions]
        N, S = len(rows), max(len(r) for r in rows) - 1
        tokens = torch.full((N, S + 1), pad_id, dtype=torch.long)
        mask = torch.zeros(N, S, dtype=torch.bool)
        sampler = torch.zeros(N, S)
        truncated = torch.tensor([c.finish_reason == "length" for c in self.completions])
        for i, (row, c) in enumerate(zip(rows, self.completions)):
            tokens[i, :len(row)] = torch.tensor(row)
            first, n = len(c.prompt_tokens) - 1, len(c.tokens)
            mask[i, first:first + n] = not (mask_truncated and truncated[i])
            sampler[i, first:first + n] = torch.tensor(c.logprobs)
        out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "sampler_logp": sampler,
               "truncated": truncated, "completion": torch.zeros(N, S, dtype=torch.bool),
               "length": torch.tensor([len(r) - 1 for r in rows])}
        for i, c in enumerate(self.completions):
            out["completion"][i, len(c.prompt_tokens) - 1:len(c.prompt_tokens) - 1 + len(c.tokens)] = True
        if self.completions[0].routing is not None:
            # the sampler's experts at every input position, -1 (the router's own choice) on the padding
            layers, k = self.completions[0].routing.shape[1:]
            out["routing"] = torch.full((N, S, layers, k), -1, dtype=torch.long)
            for i, c in enumerate(self.completions):
                out["routing"][i, :len(c.routing)] = c.routing.long()
        return out


class Sampler:
    """Draws groups from the policy and scores them."""

    def __init__(self, generator: Generator, stream: PromptStream, reward: WeightedReward, params: SamplingParams,
                 system_prompt: str, seed: int):
        self.generator, self.stream, self.reward, self.params = generator, stream, reward, params
        self.system_prompt, self.seed = system_prompt, seed

    def score(self, problems: list[Problem], completions: list[Completion]
              ) -> tuple[list[float], dict[str, list[float]], list[float]]:
        """(total reward, each term, accuracy) per completion."""
        G = self.params.num_samples
        rollouts = [Rollout(c.text, problems[i // G], len(c.tokens), c.finish_reason == "length")
                    for i, c in enumerate(completions)]
        totals, parts = self.reward(rollouts)
        acc = parts["accuracy"] if "accuracy" in parts else [accuracy(r) for r in rollouts]
        return totals, parts, acc

    def round(self, first: int, count: int) -> tuple[list[Problem], list[Completion], float]:
        problems = self.stream(first, count)
        params = SamplingParams(**{**vars(self.params), "seed": round_seed(self.seed, first)})
        start = time.perf_counter()
        result = generate_data_parallel(self.generator, [r1_prompt(p.question, self.system_prompt) for p in problems],
                                        params, gather=True)
        return problems, result.completions, time.perf_counter() - start

    def collect(self, first: int, n_groups: int, dynamic: bool, max_rounds: int) -> tuple[Batch, int]:
        """Sample n_groups prompts from position `first` on; with `dynamic`, drop groups whose rewards are
        all equal and draw further rounds of n_groups prompts until n_groups groups are kept or max_rounds
        were drawn (the extra groups of the last round are left unused, as in DAPO). Returns the batch and
        the prompts drawn."""
        G = self.params.num_samples
        batch = Batch()
        every: dict[str, list[float]] = {"reward": [], "accuracy": [], "length": [], "truncated": []}
        terms_all: dict[str, list[float]] = {}
        zero_std, seconds, drawn, rounds = 0, 0.0, 0, 0
        while rounds < (max_rounds if dynamic else 1) and len(batch.problems) < n_groups:
            problems, completions, secs = self.round(first + drawn, n_groups)
            drawn, rounds, seconds = drawn + n_groups, rounds + 1, seconds + secs
            totals, parts, acc = self.score(problems, completions)
            every["reward"] += totals
            every["accuracy"] += acc
            every["length"] += [len(c.tokens) for c in completions]
            every["truncated"] += [float(c.finish_reason == "length") for c in completions]
            for k, v in parts.items():
                terms_all.setdefault(k, []).extend(v)
            flat = zero_std_groups(torch.tensor(totals), G)
            zero_std += int(flat.sum())
            for j, p in enumerate(problems):
                if (dynamic and flat[j]) or len(batch.problems) >= n_groups:
                    continue
                batch.problems.append(p)
                batch.completions += completions[j * G:(j + 1) * G]
                batch.rewards += totals[j * G:(j + 1) * G]
        r = torch.tensor(every["reward"])
        lengths = torch.tensor(every["length"], dtype=torch.float)
        batch.stats = {
            "reward": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
            "accuracy": sum(every["accuracy"]) / len(r),
            **{f"reward/{k}": sum(v) / len(v) for k, v in terms_all.items()},
            "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
            "truncation_rate": sum(every["truncated"]) / len(r),
            "frac_zero_std": zero_std / drawn,
            "sampling_rounds": rounds, "prompts_drawn": drawn, "groups_kept": len(batch.problems),
            "sampling_tokens": int(lengths.sum()), "sampling_s": seconds,
            "sampling_tokens_per_s": lengths.sum().item() / max(seconds, 1e-9),
        }
        return batch, drawn
