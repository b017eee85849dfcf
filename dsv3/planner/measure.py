"""Measure what a training step really holds, by the planner's components: the independent side of the
planner's validation (tests/planner, benchmarks/plan_vs_measured.py).

- parameters, gradients, optimizer state: the bytes of the distinct storages of the tensors themselves;
- activations: the peak, over the step, of the bytes autograd holds for backward. Every tensor an op saves
  goes through a `saved_tensors_hooks` pack hook, which counts its storage (once, however many ops save
  it) until the last saved reference to it is released; parameters' storages are not activations and
  are skipped. Other holders of activations (Seq1F1B's key/value gradients waiting for the earlier
  segment's backward, and its keys and values that later segments read, which no saved tensor holds
  when their attention is recomputed) are added through `add_source`.
- activation checkpointing (torch.utils.checkpoint, non-reentrant): a checkpointed module's inputs go
  through the pack hook like any saved tensor; what its ops save is only a placeholder in the forward,
  and in the backward the recomputation keeps its tensors in the checkpoint's frame, out of reach of
  any hook, until autograd unpacks them. The probe wraps the frame's check that runs right after a
  recomputation, counts the recomputed storages not already counted, and samples the peak there (the
  frames stay counted while they hold recomputed tensors: a backward split into I and W leaves the
  ones only W reads). This reads torch's private `_CheckpointFrame`; a torch that renames it fails here
  loudly.
The pack hook runs in the thread that saves: measure with the F&B overlap's threads off.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
import torch.utils.checkpoint as torch_checkpoint
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
        self._sources: list[Callable[[], int]] = [self._recomputed_bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)
        self._frames: weakref.WeakSet = weakref.WeakSet()
        self._check = None

    def add_source(self, nbytes: Callable[[], int]) -> None:
        """Another holder of activation memory, read whenever the count changes."""
        self._sources.append(nbytes)

    def sample(self) -> None:
        self.peak = max(self.peak, self.live + sum(f() for f in self._sources))

    def __enter__(self) -> "ActivationPeak":
        self._skip = {p.untyped_storage().data_ptr() for m in self.models for p in [*m.parameters(), *m.buffers()]}
        self._hooks.__enter__()
        frame_cls = torch_checkpoint._CheckpointFrame
        self._check = frame_cls.check_recomputed_tensors_match
        check = self._check

        def recomputed(frame, gid):
            check(frame, gid)
            self._frames.add(frame)
            self.sample()
        frame_cls.check_recomputed_tensors_match = recomputed
        return self

    def __exit__(self, *exc) -> None:
        torch_checkpoint._CheckpointFrame.check_recomputed_tensors_match = self._check
        self._hooks.__exit__(*exc)

    def uncounted(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of the distinct storages of `tensors` that no saved tensor holds (for a source)."""
        seen, total = set(), 0
        for t in tensors:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in seen or key in self._refs or key in self._skip:
                continue
            seen.add(key)
            total += storage.nbytes()
        return total

    def _recomputed_bytes(self) -> int:
        """Storages the checkpoint frames hold from recomputations."""
        return self.uncounted(t for frame in list(self._frames) for by_handle in list(frame.recomputed.values())
                              for t in list(by_handle.values()))

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
