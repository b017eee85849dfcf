"""Tensors that several ranks hold a copy of, keyed by global name: one rule for reducing them.

A parameter or buffer `name` lives on the pipeline ranks `holders[name]`: one, or several (the
embedding on the first and on the last stage, which MTP reads; every stage twice under DualPipe;
always (0,) without pipeline parallelism), and on each of them in several data-parallel ranks
(rank = pp_rank * dp + dp_rank): all dp of them, or, for a slice of the routed experts, the dp ranks
of the same EP position (its expert-data-parallel group). Every copy saw a part of the global batch
(other micro-batches, other data, or another use of the same weight), so:

- gradient = (sum over all copies) / dp: the sum over holders is the gradient of each replica's
  loss, the mean over dp that of the global batch (a 1/m-seeded micro-batch loss per copy makes each
  replica's sum its mean loss). An expert slice's gradient already holds the sum over its EP group
  (through the backward of the token exchange: every peer's tokens that reached it), so summing over
  the EDP copies covers all dp ranks once, and the divisor is still dp;
- router expert counts: summed over the holders x all dp ranks (every rank routes its tokens).

Each is one all_reduce over the group of those ranks; all members receive the same result, so the
copies stay bitwise identical, and so do their optimizer updates. Norms and other statistics count a
replicated tensor once: on its owner, the lowest pipeline rank holding it.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from dsv3.parallel.data_parallel import average_gradients
from dsv3.parallel.layout import Layout

_Key = tuple[tuple[int, ...], bool]   # (holders, is an expert slice)


class Replicas:
    """The reduction groups of a layout; every rank must construct it (it creates groups).

    Args:
        holders: global tensor name -> sorted pipeline ranks holding it (the same on every rank).
        expert_slices: global names of the parameters that are split over the EP group.
        layout: this rank's coordinates.
    """

    def __init__(self, holders: dict[str, tuple[int, ...]], expert_slices: set[str], layout: Layout):
        self.holders, self.expert_slices, self.layout = dict(holders), set(expert_slices), layout
        self._groups: dict[_Key, Optional[dist.ProcessGroup]] = {}
        dp, ep = layout.dp, layout.ep
        keys = sorted({self._key(n) for n in self.holders})
        # new_group is collective over the world: every rank creates every group, in one order
        for hs, experts in keys:
            for position in (range(ep) if experts else [None]):
                dps = [d for d in range(dp) if position is None or d % ep == position]
                ranks = sorted(layout.global_rank(h, d) for h in hs for d in dps)
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if layout.pp_rank in hs and (position is None or position == layout.ep_rank):
                    self._groups[(hs, experts)] = group

    def _key(self, name: str) -> _Key:
        return self.holders[name], name in self.expert_slices

    def is_owner(self, name: str) -> bool:
        return self.holders[name][0] == self.layout.pp_rank

    def _by_group(self, named: Iterable[tuple[str, object]], singles: bool = False):
        """(group, [(name, item)]) per group of copies this rank is in, in one global order; groups
        of a single rank (group None: nothing to exchange) only if `singles`."""
        buckets: dict[_Key, list] = {}
        for name, t in named:
            key = self._key(name)
            if self.layout.pp_rank not in key[0]:
                raise ValueError(f"{name} is not held by pipeline rank {self.layout.pp_rank} (holders {key[0]})")
            buckets.setdefault(key, []).append((name, t))
        return [(self._groups[k], buckets[k]) for k in sorted(buckets) if singles or self._groups[k] is not None]

    def reduce_gradients(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Each gradient becomes the sum over its copies divided by dp (see the module doc)."""
        dp = self.layout.dp
        for group, items in self._by_group(((n, p) for n, p in named_params if p.requires_grad), singles=True):
            if group is not None:
                average_gradients([p for _, p in items], group=group, divisor=dp)
            elif dp > 1:  # the only copy of an expert slice (ep = dp): still a 1/dp share of the batch
                for _, p in items:
                    if p.grad is not None:
                        p.grad.div_(dp)

    @torch.no_grad()
    def sum_rows(self, names: list[str], rows: torch.Tensor) -> None:
        """In place: row i of `rows` (a value of the tensor `names[i]`, never an expert slice) summed
        over its copies."""
        for group, items in self._by_group(zip(names, range(len(names)))):
            index = torch.tensor([i for _, i in items], device=rows.device)
            part = rows.index_select(0, index)
            dist.all_reduce(part, group=group)
            rows.index_copy_(0, index, part)
