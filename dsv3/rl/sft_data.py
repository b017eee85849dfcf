"""Cold-start SFT data: prompt/completion pairs, tokenized, packed into fixed-length rows whose labels
count only completion tokens.

A row holds seq_len + 1 tokens (inputs and, shifted by one, the labels, like pretraining samples).
An example is prompt tokens + completion tokens + EOS; the labels that predict a completion token or
the EOS count, every other label (prompt, padding) is -100. With packing, examples follow each other
in a row; every token also carries its example's number in the row, so that with
`data.document_masks=true` attention stays inside each example (as for pretraining documents).
Without document masks, attention crosses example boundaries like pretraining's packed documents do:
an example can see the ones before it in its row, never learn from their tokens. Without packing every
example has a row of its own (padded with EOS): nothing to see but itself.
"""
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from dsv3.config.post_training import SFTConfig, TaskConfig
from dsv3.model.transformer import IGNORE
from dsv3.rl.tasks import mixture
from dsv3.rl.template import r1_completion, r1_prompt

log = logging.getLogger(__name__)


@dataclass
class Example:
    prompt: str
    completion: str


def task_examples(tasks: TaskConfig, split: str, n: int, system_prompt: str) -> list[Example]:
    """n problems of the split in the R1 template, answered with their programmatic step-by-step traces."""
    return [Example(r1_prompt(p.question, system_prompt), r1_completion(p.trace, p.answer))
            for p in mixture(tasks.families, tasks.difficulties, split, n, tasks.seed, tasks.held_out_fraction)]


def jsonl_examples(path: str, system_prompt: str, raw: bool) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in ("prompt", "completion") if not isinstance(rec.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{i + 1}: no string field {missing[0]!r} "
                                 "(each line needs prompt and completion)")
            prompt = rec["prompt"] if raw else r1_prompt(rec["prompt"], system_prompt)
            out.append(Example(prompt, rec["completion"]))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def sft_examples(cfg: SFTConfig, tasks: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples as the config says."""
    if cfg.source == "tasks":
        return (task_examples(tasks, "train", cfg.examples, cfg.system_prompt),
                task_examples(tasks, "held_out", cfg.val_examples, cfg.system_prompt))
    examples = jsonl_examples(cfg.path, cfg.system_prompt, cfg.raw)
    if len(examples) <= cfg.val_examples:
        raise ValueError(f"{cfg.path}: {len(examples)} examples, not more than sft.val_examples={cfg.val_examples}")
    return examples[:-cfg.val_examples], examples[-cfg.val_examples:]


class SFTDataset:
    """Rows of seq_len + 1 token ids with a flag per token: does a label predicting it count."""

    def __init__(self, examples: list[Example], tokenizer, eos: int, seq_len: int, packing: bool):
        rows_tokens: list[list[int]] = []
        rows_counts: list[list[bool]] = []
        rows_docs: list[list[int]] = []
        width = seq_len + 1
        cur_t: list[int] = []
        cur_c: list[bool] = []
        cur_d: list[int] = []
        prompts = tokenizer.encode_batch([e.prompt for e in examples])
        completions = tokenizer.encode_batch([e.completion for e in examples])
        for i, (p, c) in enumerate(zip(prompts, completions)):
            toks = p.ids + c.ids + [eos]
            counts = [False] * len(p.ids) + [True] * (len(c.ids) + 1)
            if len(toks) > width:
                raise ValueError(f"SFT example {i} has {len(toks)} tokens (prompt {len(p.ids)}, completion "
                                 f"{len(c.ids)}, EOS): more than data.seq_len + 1 = {width}; raise data.seq_len "
                                 "or shorten the example")
            if cur_t and (not packing or len(cur_t) + len(toks) > width):
                rows_tokens.append(cur_t)
                rows_counts.append(cur_c)
                rows_docs.append(cur_d)
                cur_t, cur_c, cur_d = [], [], []
            cur_t, cur_c = cur_t + toks, cur_c + counts
            cur_d = cur_d + [cur_d[-1] + 1 if cur_d else 0] * len(toks)
        if cur_t:
            rows_tokens.append(cur_t)
            rows_counts.append(cur_c)
            rows_docs.append(cur_d)
        self.tokens = np.full((len(rows_tokens), width), eos, dtype=np.int64)
        self.counted = np.zeros((len(rows_tokens), width), dtype=bool)
        self.documents = np.zeros((len(rows_tokens), width), dtype=np.int64)
        for r, (t, c, d) in enumerate(zip(rows_tokens, rows_counts, rows_docs)):
            self.tokens[r, :len(t)], self.counted[r, :len(c)] = t, c
            self.documents[r, :len(d)], self.documents[r, len(d):] = d, d[-1] + 1  # the padding: one more
        self.counted[:, 0] = False  # no label predicts a row's first token
        self.n_examples = len(examples)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [B, seq_len], labels [B, seq_len] with -100 where the label does not count, the inputs'
        example numbers [B, seq_len] for document masks)."""
        indices = list(indices)
        rows = torch.from_numpy(self.tokens[indices])
        labels = rows[:, 1:].masked_fill(~torch.from_numpy(self.counted[indices][:, 1:]), IGNORE)
        return rows[:, :-1], labels, torch.from_numpy(self.documents[indices][:, :-1])

    def label_count(self, indices: list[int]) -> int:
        return int(self.counted[indices].sum())

    def report(self, before: int, after: int, step: int) -> dict:
        return {"data/epoch/sft": after / len(self)}

    def describe(self) -> str:
        used = self.counted.sum()
        return (f"{self.n_examples} examples in {len(self)} rows of {self.tokens.shape[1] - 1} tokens, "
                f"{used} completion tokens ({used / self.counted.size:.0%} of all)")
