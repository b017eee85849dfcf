"""Growing the vocabulary of a trained model: the embedding and the output head get rows for new tokens
(special tokens added to its tokenizer), and every existing row keeps its value, so the model's
predictions among the old tokens do not change.

A new row starts at the mean of the old rows: its embedding is an "average token" rather than noise of
an unrelated scale, and its logit starts at the mean logit, so a new token is neither favoured nor
impossible before fine-tuning teaches it (a common choice, e.g. transformers' mean resizing).
"""
import dataclasses

import torch
from torch import nn

from dsv3.model.transformer import Transformer

GROWN = ("embed.weight", "head.weight")  # the state-dict entries with one row per token


def grow_rows(weight: torch.Tensor, new_size: int) -> torch.Tensor:
    """[V, d] -> [new_size, d]: the old rows, then rows equal to their mean."""
    old = weight.shape[0]
    if new_size < old:
        raise ValueError(f"cannot shrink a vocabulary of {old} rows to {new_size}")
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(new_size - old, -1)], dim=0)


def grow_state_dict(sd: dict[str, torch.Tensor], new_size: int) -> dict[str, torch.Tensor]:
    """A model state dict with its per-token entries grown to `new_size` rows."""
    return {k: grow_rows(v, new_size) if k in GROWN else v for k, v in sd.items()}


@torch.no_grad()
def grow_vocab(model: Transformer, new_size: int) -> None:
    """Grow `model`'s embedding and output head to `new_size` tokens in place (model.cfg follows).
    Call before building the optimizer: the two parameters are replaced by new ones."""
    embed, head = model.embed.weight, model.head.weight
    model.embed = nn.Embedding(new_size, embed.shape[1], device=embed.device, dtype=embed.dtype)
    model.embed.weight.copy_(grow_rows(embed, new_size))
    model.head = nn.Linear(head.shape[1], new_size, bias=False, device=head.device, dtype=head.dtype)
    model.head.weight.copy_(grow_rows(head, new_size))
    model.cfg = dataclasses.replace(model.cfg, vocab_size=new_size)
