"""Batched generation: G samples per prompt, stop tokens and strings, per-token log-probabilities, and
self-speculative decoding with the MTP module.

Speculative decoding with MTP (V3 report §5.4.3). The MTP module reads the main model's hidden state at
position i and the embedding of token i+1 and predicts token i+2, so right after the model has produced
token i+1 it can draft i+2. Each step feeds [t, d] (the last token and its draft) to the model:
- greedy: the draft is kept iff it is the model's argmax after t; then the model's prediction after d
  comes for free, so a step yields two tokens, or one on a rejection. The output is the plain greedy
  output, token for token.
- sampling (standard speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): with the
  model's distribution p and the draft's q (both after temperature, top-k and top-p), keep d with
  probability min(1, p(d)/q(d)), else draw from max(p - q, 0) renormalized. Every token is then
  distributed exactly as plain sampling from p would draw it.
A rejected draft's cache slot is invalidated (its row steps back one position); no cache is copied.
"""
import time
from dataclasses import dataclass, field

import torch

from dsv3.generate.cache import DecodeState
from dsv3.generate.decoder import CachedDecoder
from dsv3.generate.sampling import (RowRandom, SamplingParams, choose, draw, policy_logprobs, row_seed,
                                    sampling_logprobs)
from dsv3.model import Transformer
from dsv3.model.moe import MoE
from dsv3.model.step_aux import StepAux


def routing_layers(model: Transformer) -> list[MoE]:
    """The MoE layers whose routing generation records, in the order of Completion.routing's layer axis:
    the main model's, first to last (the MTP modules do not run on the positions of plain decoding)."""
    return [block.ffn for block in model.layers.values() if block.is_moe]


@dataclass
class Completion:
    """One generated sample."""

    prompt_index: int
    """Index of its prompt in the list given to `generate`."""
    sample_index: int
    """g in 0..G-1 within its prompt's group."""
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    """Completion token ids, up to and including the stop token / the token completing a stop string."""
    logprobs: list[float] = field(default_factory=list)
    """log softmax(logits / T) of each completion token under the model (T = 1 when greedy)."""
    finish_reason: str = "length"
    """`stop` (stop token or stop string), `length` (max_new_tokens or the end of the context)."""
    routing: torch.Tensor | None = None
    """With SamplingParams.record_routing: [len(prompt_tokens) + len(tokens) - 1, MoE layers, K] int16 (CPU),
    the experts each MoE layer of `routing_layers(model)` sent each position of prompt + completion to
    (the last completion token is never read). Position t is position t of a full forward over the row."""
    text: str | None = None
    """Decoded completion, special tokens included, without a final stop token, cut after the first stop
    string (None without a tokenizer)."""


@dataclass
class GenerationResult:
    completions: list[Completion]
    """Prompt-major: completions[i * G + g] is sample g of prompt i."""
    stats: dict

    def padded(self, pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Completion ids [N, L] (right-padded with pad_id), their log-probs [N, L] and mask [N, L]."""
        L = max([len(c.tokens) for c in self.completions] + [1])
        ids = torch.full((len(self.completions), L), pad_id, dtype=torch.long)
        logp = torch.zeros(len(self.completions), L)
        mask = torch.zeros(len(self.completions), L, dtype=torch.bool)
        for i, c in enumerate(self.completions):
            n = len(c.tokens)
            ids[i, :n] = torch.tensor(c.tokens, dtype=torch.long)
            logp[i, :n] = torch.tensor(c.logprobs)
            mask[i, :n] = True
        return ids.to(device), logp.to(device), mask.to(device)


def prompts_from_padded(ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Token lists from a padded batch, whichever side it was padded on."""
    return [row[m.bool()].tolist() for row, m in zip(ids, attention_mask)]


class Generator:
    """Samples completions from a Transformer with the latent KV cache.

    tokenizer: a `tokenizers.Tokenizer`, needed for text prompts, stop strings and decoded text.
    attention: `auto` (naive form for prefill, absorbed for decoding), `absorbed` or `naive`."""

    def __init__(self, model: Transformer, tokenizer=None, attention: str = "auto"):
        self.model, self.tokenizer = model, tokenizer
        self.decoder = CachedDecoder(model, attention)

    # -- input -------------------------------------------------------------------------------------------
    def _tokenize(self, prompts) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (Generator(model, tokenizer=...))")
                p = self.tokenizer.encode(p).ids
            p = [int(t) for t in p]
            if not p:
                raise ValueError(f"prompt {i} is empty")
            vocab = self.model.cfg.vocab_size
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}) (model.vocab_size={vocab})")
            if len(p) >= self.model.cfg.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens: no room to generate within the model's "
                                 f"context (model.max_seq_len={self.model.cfg.max_seq_len})")
            out.append(p)
        return out

    def _stop_ids(self, p: SamplingParams) -> set[int]:
        if p.stop_token_ids is not None:
            return set(p.stop_token_ids)
        if self.tokenizer is None:
            return set()
        from dsv3.data.tokenizer import eos_id

        try:
            return {eos_id(self.tokenizer)}
        except ValueError:
            return set()

    # -- main entry ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, params: SamplingParams, prompt_ids: list[int] | None = None) -> GenerationResult:
        """prompts: texts or token-id lists (of any lengths). prompt_ids: the ids that seed each prompt's
        rows (default 0..n-1); give global ids when prompts are split over ranks, so that every plan
        draws the same samples."""
        params.validate()
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        if params.speculative == "mtp" and len(self.model.mtp) == 0:
            raise ValueError("speculative='mtp' needs a model with an MTP module, but this one has "
                             "model.mtp_depth=0")
        tokens = self._tokenize(prompts)
        prompt_ids = list(range(len(tokens))) if prompt_ids is None else list(prompt_ids)
        if len(prompt_ids) != len(tokens):
            raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(tokens)} prompts")
        G = params.num_samples
        self._out = [Completion(i, g, tokens[i]) for i in range(len(tokens)) for g in range(G)]
        self._params, self._stop = params, self._stop_ids(params)
        ctx = self.model.cfg.max_seq_len
        self._limit = [min(params.max_new_tokens, ctx - len(c.prompt_tokens)) for c in self._out]
        self._stats = {"forward_calls": 0, "row_steps": 0, "drafts": 0, "accepted": 0}
        self._routing: list[list[torch.Tensor]] | None = None
        if params.record_routing:
            if not routing_layers(self.model):
                raise ValueError("record_routing=True needs a model with MoE layers, but every layer of this one "
                                 "is dense (model.n_dense_layers >= model.n_layers)")
            self._routing = [[] for _ in self._out]
        self.model.eval()
        start = time.perf_counter()
        if params.speculative == "mtp":
            self._speculative([prompt_ids[c.prompt_index] for c in self._out])
        else:
            self._plain([prompt_ids[c.prompt_index] for c in self._out])
        elapsed = time.perf_counter() - start
        for i, c in enumerate(self._out):
            c.text = self._text(c) if self.tokenizer is not None else None
            if self._routing is not None:
                c.routing = torch.cat(self._routing[i]).to("cpu", torch.int16)
                assert c.routing.shape[0] == len(c.prompt_tokens) + len(c.tokens) - 1
        n_tokens = sum(len(c.tokens) for c in self._out)
        stats = {**self._stats, "completion_tokens": n_tokens, "seconds": elapsed,
                 "tokens_per_s": n_tokens / max(elapsed, 1e-9)}
        if params.speculative == "mtp":
            stats["acceptance_rate"] = self._stats["accepted"] / max(self._stats["drafts"], 1)
        return GenerationResult(self._out, stats)

    # -- shared pieces ----------------------------------------------------------------------------------
    def _prefill(self, rows: list[int], slots_per_token: int):
        prompts = [self._out[r].prompt_tokens for r in rows]
        P = max(len(p) for p in prompts)
        device = self.model.embed.weight.device
        ids = torch.zeros(len(rows), P, dtype=torch.long)
        valid = torch.zeros(len(rows), P, dtype=torch.bool)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token is in slot P-1
            ids[i, P - len(p):] = torch.tensor(p)
            valid[i, P - len(p):] = True
        capacity = P + slots_per_token * max(self._limit[r] for r in rows) + 2
        state = DecodeState.allocate(self.model, len(rows), capacity, self.model.embed.weight.dtype, device,
                                     with_mtp=slots_per_token == 2)
        aux = self._aux()
        h, logits, start, positions = self.decoder.forward(state, ids.to(device), valid.to(device), aux)
        self._record(aux, rows, [P - len(p) for p in prompts])
        self._stats["forward_calls"] += 1
        return state, ids.to(device), h, logits, start, positions

    def _aux(self) -> StepAux | None:
        return StepAux(record_experts=True) if self._routing is not None else None

    def _record(self, aux: StepAux | None, rows: list[int], first: list[int]) -> None:
        """Keep the routing of a forward's slots first[i]: of each row rows[i] (the slots before are left
        padding; every slot after holds a token of the row)."""
        if aux is None:
            return
        experts = torch.stack([aux.experts[m] for m in routing_layers(self.model)], dim=2)  # [B, S, layers, K]
        for i, r in enumerate(rows):
            self._routing[r].append(experts[i, first[i]:])

    def _append(self, r: int, token: int, logprob: float) -> bool:
        """Add a token to row r's completion; True if the row is finished."""
        c = self._out[r]
        c.tokens.append(token)
        c.logprobs.append(logprob)
        if token in self._stop:
            c.finish_reason = "stop"
            return True
        if self._params.stop_strings and self._hits_stop_string(c):
            c.finish_reason = "stop"
            return True
        return len(c.tokens) >= self._limit[r]

    def _hits_stop_string(self, c: Completion) -> bool:
        longest = max(len(s) for s in self._params.stop_strings)
        tail = self.tokenizer.decode(c.tokens[-(4 * longest + 4):], skip_special_tokens=False)
        return any(s in tail for s in self._params.stop_strings)

    def _text(self, c: Completion) -> str:
        ids = c.tokens[:-1] if c.tokens and c.tokens[-1] in self._stop else c.tokens  # the stop token is no text
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        ends = [text.find(s) + len(s) for s in self._params.stop_strings if s in text]
        return text[:min(ends)] if ends else text

    # -- plain decoding ---------------------------------------------------------------------------------
    def _plain(self, seeds_by_row: list[int]) -> None:
        p = self._params
        rows = list(range(len(self._out)))
        rng = RowRandom([row_seed(p.seed, pid, self._out[r].sample_index) for r, pid in zip(rows, seeds_by_row)],
                        self.model.embed.weight.device)
        state, _, _, logits, _, _ = self._prefill(rows, slots_per_token=1)
        last = logits[:, -1]
        while True:
            token, _ = choose(last, p, rng)
            logp = policy_logprobs(last, p.temperature).gather(1, token[:, None])[:, 0]
            keep = [i for i, r in enumerate(rows) if not self._append(r, int(token[i]), float(logp[i]))]
            if not keep:
                return
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=token.device)
                state, token = state.select(idx), token[idx]
                rng.select(keep)
                rows = [rows[i] for i in keep]
            aux = self._aux()
            _, logits, _, _ = self.decoder.forward(state, token[:, None], aux=aux)
            self._record(aux, rows, [0] * len(rows))
            self._stats["forward_calls"] += 1
            self._stats["row_steps"] += len(rows)
            last = logits[:, -1]

    # -- speculative decoding with the MTP draft --------------------------------------------------------
    def _draft(self, logits: torch.Tensor, rng: RowRandom) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft token per row from the MTP logits, and q (its sampling log-probs) when sampling."""
        if self._params.greedy:
            return logits.argmax(dim=-1), None
        return choose(logits, self._params, rng)

    def _speculative(self, seeds_by_row: list[int]) -> None:
        p = self._params
        rows = list(range(len(self._out)))
        device = self.model.embed.weight.device
        rng = RowRandom([row_seed(p.seed, pid, self._out[r].sample_index) for r, pid in zip(rows, seeds_by_row)],
                        device)
        state, ids, h, logits, start, positions = self._prefill(rows, slots_per_token=2)
        last = logits[:, -1]
        token, _ = choose(last, p, rng)
        logp = policy_logprobs(last, p.temperature).gather(1, token[:, None])[:, 0]
        keep = [i for i, r in enumerate(rows) if not self._append(r, int(token[i]), float(logp[i]))]
        # The MTP module over the prompt: position j reads h_j and the token after it.
        next_tokens = torch.cat([ids[:, 1:], token[:, None]], dim=1)
        draft_logits = self.decoder.mtp_forward(state, start, positions, h, next_tokens)[:, -1]
        draft, q = self._draft(draft_logits, rng)
        while keep:
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=device)
                state, token, draft = state.select(idx), token[idx], draft[idx]
                q = q[idx] if q is not None else None
                rng.select(keep)
                rows = [rows[i] for i in keep]
            h, logits, start, positions = self.decoder.forward(state, torch.stack([token, draft], dim=1))
            self._stats["forward_calls"] += 1
            self._stats["row_steps"] += len(rows)
            self._stats["drafts"] += len(rows)
            first, accepted = self._verify(logits[:, 0], draft, q, rng)
            second, _ = choose(logits[:, 1], p, rng)  # the token after an accepted draft
            self._stats["accepted"] += int(accepted.sum())
            state.invalidate(~accepted, start + 1)
            logp0 = policy_logprobs(logits[:, 0], p.temperature).gather(1, first[:, None])[:, 0]
            logp1 = policy_logprobs(logits[:, 1], p.temperature).gather(1, second[:, None])[:, 0]
            keep, took_two = [], accepted.clone()
            for i, r in enumerate(rows):
                done = self._append(r, int(first[i]), float(logp0[i]))
                if not done and accepted[i]:
                    done = self._append(r, int(second[i]), float(logp1[i]))
                elif accepted[i]:
                    took_two[i] = False
                if not done:
                    keep.append(i)
            if not keep:
                return
            # The MTP module over the two slots just fed: (h at t, the token after t) and, where the draft
            # was accepted, (h at the draft, the token after it); it drafts from the last kept slot.
            mtp_logits = self.decoder.mtp_forward(state, start, positions, h, torch.stack([first, second], dim=1))
            draft_logits = torch.where(took_two[:, None], mtp_logits[:, 1], mtp_logits[:, 0])
            token = torch.where(took_two, second, first)
            draft, q = self._draft(draft_logits, rng)

    def _verify(self, logits: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, rng: RowRandom
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token at the draft's position and whether it is the draft."""
        if self._params.greedy:
            target = logits.argmax(dim=-1)
            return target, target == draft
        logp = sampling_logprobs(logits, self._params)
        lp_d, lq_d = logp.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
        accepted = rng.uniform(1)[:, 0].log() < (lp_d - lq_d)
        residual = (logp.exp() - q.exp()).clamp(min=0)
        # p == q exactly leaves no residual mass; then a rejection cannot happen, any row will do
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, logp.exp())
        resampled = draw(residual.log(), rng)
        return torch.where(accepted, draft, resampled), accepted
