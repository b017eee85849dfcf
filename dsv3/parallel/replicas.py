"""Tensors that several ranks hold a copy of, keyed by global name: one rule for reducing them.

Under pipeline parallelism a parameter or buffer `name` lives on the pipeline ranks
`holders[name]`: one, or several (the embedding on the first and on the last stage, which MTP
reads; every stage twice under DualPipe), and on each of them in all dp data-parallel replicas
(rank = pp_rank * dp + dp_rank). Every copy saw a part of the global batch (other micro-batches,
other data, or another use of the same weight), so:

- gradient = (sum over the holders x dp copies) / dp: the sum over holders is the gradient of each
  replica's loss, the mean over dp that of the global batch (a 1/m-seeded micro-batch loss per
  copy makes each replica's sum its mean loss);
- router expert counts: summed over the same copies (the whole global batch).

Each is one all_reduce over the group of those ranks; all members receive the same result, so
the copies stay bitwise identical, and so do their optimizer updates. Norms and other statistics
count a replicated tensor once: on its owner, the lowest pipeline rank holding it.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from dsv3.parallel.data_parallel import average_gradients


class Replicas:
    """The reduction groups of a pipeline layout; every rank must construct it (it creates groups).

    Args:
        holders: global tensor name -> sorted pipeline ranks holding it (the same on every rank).
        pp_rank, dp_rank, dp: this rank's coordinates and the data-parallel size.
    """

    def __init__(self, holders: dict[str, tuple[int, ...]], pp_rank: int, dp_rank: int, dp: int):
        self.holders, self.pp_rank, self.dp = dict(holders), pp_rank, dp
        self._groups: dict[tuple[int, ...], Optional[dist.ProcessGroup]] = {}
        # new_group is collective over the world: every rank creates every group, in one order
        for hs in sorted(set(self.holders.values())):
            ranks = sorted(h * dp + d for h in hs for d in range(dp))
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if pp_rank in hs:
                self._groups[hs] = group

    def is_owner(self, name: str) -> bool:
        return self.holders[name][0] == self.pp_rank

    def _by_group(self, named: Iterable[tuple[str, torch.Tensor]]):
        """(group, [(name, tensor)]) per holder set this rank is in, in one global order; groups
        of a single rank (nothing to reduce) are left out."""
        buckets: dict[tuple[int, ...], list] = {}
        for name, t in named:
            hs = self.holders[name]
            if self.pp_rank not in hs:
                raise ValueError(f"{name} is not held by pipeline rank {self.pp_rank} (holders {hs})")
            buckets.setdefault(hs, []).append((name, t))
        return [(self._groups[hs], buckets[hs]) for hs in sorted(buckets) if self._groups[hs] is not None]

    def reduce_gradients(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Each gradient becomes the sum over its copies divided by dp (see the module doc)."""
        for group, items in self._by_group((n, p) for n, p in named_params if p.requires_grad):
            average_gradients([p for _, p in items], group=group, divisor=self.dp)

    @torch.no_grad()
    def sum_rows(self, names: list[str], rows: torch.Tensor) -> None:
        """In place: row i of `rows` (a value of the tensor `names[i]`) summed over its copies."""
        for group, items in self._by_group(zip(names, range(len(names)))):
            index = torch.tensor([i for _, i in items], device=rows.device)
            part = rows.index_select(0, index)
            dist.all_reduce(part, group=group)
            rows.index_copy_(0, index, part)
