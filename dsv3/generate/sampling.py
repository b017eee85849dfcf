"""What to sample and how: the parameters, the distribution they define, and seeded per-row randomness.

Every generated row draws its random numbers from its own generator, seeded by (seed, prompt id,
sample index). A row's tokens therefore do not depend on which other rows share its batch, on batch
compaction as rows finish, or on how prompts are split over data-parallel ranks: the same seed gives
the same samples under any plan.
"""
import hashlib
import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to sample completions."""

    max_new_tokens: int = 64
    """Completion tokens at most (fewer when the model's context ends first)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy decoding (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    num_samples: int = 1
    """G: completions per prompt (a GRPO group)."""
    stop_strings: tuple[str, ...] = ()
    """A completion ends once its text contains one of these (kept in the text and tokens). Needs a tokenizer."""
    stop_token_ids: tuple[int, ...] | None = None
    """A completion ends on one of these token ids (kept); None = the tokenizer's end-of-text token, if any."""
    seed: int = 0
    """Seeds every row's generator together with its prompt id and sample index."""
    speculative: str | None = None
    """None, or `mtp`: the model's first MTP module drafts one token per step, the model verifies it."""
    record_routing: bool = False
    """Keep, for every position of each prompt + completion that the model read, the experts each MoE layer
    routed it to (`Completion.routing`): what RL's router replay feeds back to the training forward."""

    def validate(self) -> None:
        def bad(name, value, allowed):
            raise ValueError(f"{name}={value!r}: {allowed}")

        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if not (0 < self.top_p <= 1):
            bad("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        if not (isinstance(self.num_samples, int) and self.num_samples >= 1):
            bad("num_samples", self.num_samples, "must be an integer >= 1")
        if self.speculative not in (None, "mtp"):
            bad("speculative", self.speculative, "must be None or 'mtp'")
        if self.record_routing and self.speculative is not None:
            bad("record_routing", self.record_routing, "is not supported with speculative decoding (a rejected "
                "draft's slot would need its routing dropped); use speculative=None")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop_strings", self.stop_strings, "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def policy_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) over the whole vocabulary (T = 1 when greedy): the per-token log-probability
    a trainer recomputes for the policy, before any top-k / top-p truncation."""
    return torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)


def sampling_logprobs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from: temperature, then top-k, then top-p,
    renormalized; -inf outside the kept set. [N, V] -> [N, V] fp32."""
    logp = policy_logprobs(logits, p.temperature)
    if p.top_k and p.top_k < logp.shape[-1]:
        kth = logp.topk(p.top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()  # mass of the more likely tokens
        drop = before >= p.top_p                                       # the first token is always kept
        logp = logp.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logp, dim=-1)


def row_seed(seed: int, prompt_id: int, sample_index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RowRandom:
    """One torch.Generator per row; rows leave as they finish (`select`)."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.device = device
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def uniform(self, n: int) -> torch.Tensor:
        """[rows, n] uniforms in (0, 1), each row from its own stream."""
        u = torch.stack([torch.rand(n, generator=g, device=self.device) for g in self.gens])
        return u.clamp_(min=torch.finfo(u.dtype).tiny)

    def select(self, rows: list[int]) -> None:
        self.gens = [self.gens[i] for i in rows]


def draw(logp: torch.Tensor, rng: RowRandom) -> torch.Tensor:
    """One token per row from exp(logp) [N, V] (Gumbel-max: argmax of logp + Gumbel noise)."""
    gumbel = -torch.log(-torch.log(rng.uniform(logp.shape[-1])))
    return (logp + gumbel).argmax(dim=-1)


def choose(logits: torch.Tensor, p: SamplingParams, rng: RowRandom | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [N] from logits [N, V] (argmax when greedy) and the sampling distribution's log-probs."""
    if p.greedy:
        return logits.argmax(dim=-1), policy_logprobs(logits, 0)
    logp = sampling_logprobs(logits, p)
    return draw(logp, rng), logp
