"""Measure what a training step really holds, by the planner's components: the independent side of the
planner's validation (tests/planner, benchmarks/plan_vs_measured.py).

- parameters, gradients, optimizer state: the bytes of the distinct storages of the tensors themselves;
- activations: the peak, over the step, of the bytes autograd holds for backward. Every tensor an op saves
  goes through a `saved_tensors_hooks` pack hook, which counts its storage (once, however many ops save
  it) until the last saved reference to it is released; parameters' storages are not activations and
  are skipped. Other holders of activations (Seq1F1B's key/value gradients waiting for the earlier
  segment's backward) are added through `add_source`.
The pack hook runs in the thread that saves: measure with the F&B overlap's threads off.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def param_bytes(model: nn.Module) -> int:
    return storage_bytes(model.parameters())


def grad_bytes(model: nn.Module) -> int:
    return storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


class _Held:
    """What the pack hook hands autograd: the tensor, and a release of its storage's count when dropped."""

    __slots__ = ("tensor", "key", "probe")

    def __init__(self, tensor: torch.Tensor, key: int, probe: "ActivationPeak"):
        self.tensor, self.key, self.probe = tensor, key, probe

    def __del__(self):
        self.probe._release(self.key)


class ActivationPeak:
    """with ActivationPeak(model) as peak: <forward and backward>   ->  peak.peak (bytes), peak.live"""

    def __init__(self, *models: nn.Module):
        self.models = models
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._skip: set[int] = set()
        self._sources: list[Callable[[], int]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)

    def add_source(self, nbytes: Callable[[], int]) -> None:
        """Another holder of activation memory, read whenever the count changes."""
        self._sources.append(nbytes)

    def sample(self) -> None:
        self.peak = max(self.peak, self.live + sum(f() for f in self._sources))

    def __enter__(self) -> "ActivationPeak":
        self._skip = {p.untyped_storage().data_ptr() for m in self.models for p in [*m.parameters(), *m.buffers()]}
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        # a detached alias: holding an op's own output with its grad_fn would make a reference cycle
        # (node -> saved -> tensor -> node) that a retained graph (the B/W split) never frees
        t = t.detach()
        if key in self._skip or storage.nbytes() == 0:
            return _Held(t, -1, self)
        if self._refs.get(key, 0) == 0:
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
        self._refs[key] = self._refs.get(key, 0) + 1
        self.sample()
        return _Held(t, key, self)

    def _release(self, key: int) -> None:
        if key == -1:
            return
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._sizes.pop(key)
