"""Held-out figures of one batch beyond the main loss: next-token accuracy and, per MTP depth k, the
module's own loss and accuracy on the token k+1 ahead, and how often its guess equals the main model's
guess at that position (the acceptance rate of greedy self-speculative decoding with the MTP module as
the draft, which V3 §5.4.3 reports as 85-90% for the second token).

The output head is shared by the main model and every MTP depth, and `Transformer.losses` calls it in
that order (main, then depth 1, 2, ...): a forward hook on it sees each depth's logits, so nothing in
the model changes for evaluation.
"""
from contextlib import AbstractContextManager

import torch

from dsv3.model import Transformer
from dsv3.model.transformer import IGNORE


@torch.no_grad()
def heldout_sums(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor, documents: torch.Tensor | None,
                 autocast: AbstractContextManager) -> dict[str, torch.Tensor]:
    """Sums over the batch's predictions (divide by the matching `*_count`): `loss` (main CE x tokens),
    `acc`, and per depth k `mtp{k}_loss`, `mtp{k}_acc`, `mtp{k}_accept` with `mtp{k}_count`."""
    guesses: list[torch.Tensor] = []
    hook = model.head.register_forward_hook(lambda m, i, out: guesses.append(out.argmax(dim=-1)))
    try:
        with autocast:
            parts = model.losses(tokens, labels, documents)
    finally:
        hook.remove()
    if len(guesses) != 1 + len(parts.mtp):
        raise RuntimeError(f"expected the head to run {1 + len(parts.mtp)} times (main + MTP depths), "
                           f"saw {len(guesses)}: heldout_sums relies on Transformer.losses' order")
    main = guesses[0]
    counted = labels != IGNORE  # labels that count (fine-tuning masks the prompt's)

    def total(mean: torch.Tensor, n: torch.Tensor) -> torch.Tensor:  # a mean over n labels -> their sum
        return torch.where(n > 0, mean.float() * n, torch.zeros_like(n))

    n = counted.sum().float()
    out = {"loss": total(parts.main, n), "acc": ((main == labels) & counted).sum().float(), "count": n}
    for k, (loss, guess) in enumerate(zip(parts.mtp, guesses[1:]), start=1):
        target, valid = labels[:, k:], counted[:, k:]  # depth k at position i predicts token i + k + 1
        m = valid.sum().float()
        out[f"mtp{k}_loss"] = total(loss, m)
        out[f"mtp{k}_acc"] = ((guess == target) & valid).sum().float()
        # the main model's own guess for that token is made at position i + k
        out[f"mtp{k}_accept"] = ((guess == main[:, k:]) & valid).sum().float()
        out[f"mtp{k}_count"] = m
    return {key: v.to(tokens.device) for key, v in out.items()}


def heldout_names(mtp_depth: int | None) -> list[str]:
    """The keys of `heldout_sums` for a model with `mtp_depth` MTP modules; None: the loss only (what a
    pipeline's last stage reports)."""
    if mtp_depth is None:
        return ["loss", "count"]
    return ["loss", "acc", "count"] + [f"mtp{k}_{x}" for k in range(1, mtp_depth + 1)
                                       for x in ("loss", "acc", "accept", "count")]


def heldout_figures(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Summed figures (over batches and ranks) -> `val_loss`, `val_acc`, `val_mtp{k}_loss|acc|accept`."""
    figures = {"val_loss": (sums["loss"] / sums["count"]).item()}
    if "acc" in sums:
        figures["val_acc"] = (sums["acc"] / sums["count"]).item()
    k = 1
    while f"mtp{k}_count" in sums:
        for name in ("loss", "acc", "accept"):
            figures[f"val_mtp{k}_{name}"] = (sums[f"mtp{k}_{name}"] / sums[f"mtp{k}_count"]).item()
        k += 1
    return figures
