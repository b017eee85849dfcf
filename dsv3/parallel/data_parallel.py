"""Plain data parallelism: every rank holds the whole model and the gradients are averaged after backward.

Gradients are reduced in flat fp32 buckets (one collective per ~25M values instead of one per tensor).
ZeRO and DeepSpeed plans come on top of this in their own module."""
from typing import Iterable, Optional

import torch
import torch.distributed as dist

BUCKET_NUMEL = 25_000_000


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup] = None,
                      divisor: Optional[int] = None) -> None:
    """Sum the gradients over `group` and divide by `divisor` (default: the group's size, i.e. average)."""
    if divisor is None and (not dist.is_initialized() or dist.get_world_size(group) == 1):
        return
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    divisor = world if divisor is None else divisor
    params = list(params)
    for p in params:  # every rank must put the same tensors into the same buckets
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    bucket: list[torch.Tensor] = []
    for i, g in enumerate(grads):
        bucket.append(g)
        if sum(b.numel() for b in bucket) >= BUCKET_NUMEL or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1).float() for b in bucket])
            if world > 1:
                dist.all_reduce(flat, group=group)
            flat /= divisor
            for b, chunk in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(chunk.view_as(b))
            bucket = []
