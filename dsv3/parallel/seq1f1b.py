"""Seq1F1B's sequence segments on a pipeline stage (Zhang et al. 2024, arXiv 2406.03488).

Each sequence of a micro-batch is cut into N equal segments that flow through the pipeline as micro-batches
of their own (the schedule, `generators.seq1f1b`, counts segments: micro-batch u is segment u % N of
sequence u // N). A segment's attention reads the keys and values of the earlier segments of its sequence:

- forward: every attention module of the stage (the MLA of each layer, and of the MTP blocks on the last
  stage) puts the previous segment's keys and values before its own (`MLA.kv_prefix`). What it attends
  over, [earlier segments; this one], is exactly what the next segment needs as its prefix, so the next
  segment reads a detached copy of that tensor (a leaf: no storage of its own), and that tensor becomes an
  extra root of this segment's backward;
- backward: the schedule runs a sequence's segments in reverse, so when segment j's backward starts, the
  later segments have left in the leaf's `.grad` the full gradient of segment j's keys and values; it
  enters segment j's backward with the gradient from the next stage (`ChunkCarry.grads`), and flows on
  into segment j-1's leaf.
Positions: segment j covers positions jL..jL+L-1 (RoPE, the MTP shift), set in the StepContext.
The MoE sequence-wise balance loss takes f over the whole sequence (`StepAux.parts`, named here per
segment): exact, as the segments' forwards all run before their backwards.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dsv3.model.mla import MLA
from dsv3.parallel.pipeline.executor import ChunkCarry


class SegmentKV(ChunkCarry):
    """The keys and values the segments of one stage leave for the later segments of their sequence."""

    def __init__(self, modules: list[nn.Module], ctx, seq_chunks: int, segment_len: int):
        self.ctx, self.n, self.length = ctx, seq_chunks, segment_len
        self.attns = [m for mod in modules for m in mod.modules() if isinstance(m, MLA)]
        for i, attn in enumerate(self.attns):
            attn.kv_prefix = partial(self._extend, i)
        self.current: int | None = None                                  # the segment whose forward runs
        self.recomputing: int | None = None                              # ... whose backward runs
        self.roots: dict[int, list[torch.Tensor]] = {}                    # mb -> tensors later segments read
        self.leaves: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}   # mb -> attention -> (k, v)

    def _extend(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mb = self.current
        if mb is None:
            # activation checkpointing runs this attention again in the backward of segment `recomputing`:
            # the same prefix as its forward, nothing handed on
            mb = self.recomputing
            if mb is None or not torch.is_grad_enabled():    # a whole sequence (evaluation)
                return k, v
            if mb % self.n > 0:
                pk, pv = self.leaves[mb - 1][i]
                k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
            return k, v
        j = mb % self.n
        if j > 0:
            pk, pv = self.leaves[mb - 1][i]
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
        if j < self.n - 1:
            self.roots[mb] += [k, v]
            self.leaves[mb][i] = (k.detach().requires_grad_(), v.detach().requires_grad_())
        return k, v

    def _name_part(self, mb: int | None) -> None:
        """The balance loss's statistics over whole sequences (StepAux.parts) file what runs under it."""
        if self.ctx.aux.parts is not None:
            self.ctx.aux.parts.at = None if mb is None else (mb // self.n, mb % self.n)

    def begin(self, mb: int) -> None:
        self.current = mb
        self.roots[mb], self.leaves[mb] = [], {}
        self.ctx.start = (mb % self.n) * self.length
        self._name_part(mb)

    def end(self, mb: int) -> list[torch.Tensor]:
        self.current, self.ctx.start = None, 0
        self._name_part(None)
        return self.roots.pop(mb)

    def grads(self, mb: int) -> list[torch.Tensor | None]:
        if mb % self.n == self.n - 1:
            return []
        # in the order of the roots: the attention modules' calls
        return [g for k, v in self.leaves[mb].values() for g in (k.grad, v.grad)]

    def begin_backward(self, mb: int) -> None:
        self.recomputing = mb
        self._name_part(mb)

    def release(self, mb: int) -> None:
        self.leaves.pop(mb)       # aliases of this segment's roots (no storage of their own until now)
        self.recomputing = None
        self._name_part(None)

    def carried(self) -> list[torch.Tensor]:
        """The keys and values later segments read (aliases of this stage's roots): for the memory measurement."""
        return [t for leaves in self.leaves.values() for kv in leaves.values() for t in kv]

    def pending_grad_bytes(self) -> int:
        """Bytes of the key/value gradients the later segments left, waiting for their segment's backward
        (activation memory beyond what autograd saves; the memory measurement adds it)."""
        seen, total = set(), 0
        for leaves in self.leaves.values():
            for k, v in leaves.values():
                for g in (k.grad, v.grad):
                    if g is not None and g.untyped_storage().data_ptr() not in seen:
                        seen.add(g.untyped_storage().data_ptr())
                        total += g.untyped_storage().nbytes()
        return total
