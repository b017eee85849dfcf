"""Measure what autograd keeps for backward, by module and dtype (`saved_tensors_hooks`).

Used by the tests (is what the recipe claims to cache in FP8 really FP8?) and by
`benchmarks/fp8_convergence.py` (bytes per token, FP8 vs fp32/bf16). Counted: every storage a forward
saves for backward, once, attributed to the innermost module running when it was saved. Not counted:
storages of parameters and buffers (weights are not activations; views such as `weight.t()` share them).
"""
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Saved:
    """One saved storage: the module that saved it (qualified name and class), its dtype, shape and bytes."""

    module: str
    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class SavedTensorLedger:
    """with SavedTensorLedger(model) as ledger: loss = model(...)   ->  ledger.records

    Keep the graph (the loss) alive until the ledger is read: the storage addresses that deduplicate
    the records stay valid only while autograd holds the saved tensors."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: list[Saved] = []
        self._stack: list[tuple[str, str]] = []
        self._seen: set[int] = set()
        self._handles = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __enter__(self) -> "SavedTensorLedger":
        self._seen = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter_module(name, type(module).__name__)))
            self._handles.append(module.register_forward_hook(self._leave_module))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter_module(self, name: str, kind: str):
        def hook(module, args):
            self._stack.append((name, kind))
        return hook

    def _leave_module(self, module, args, output) -> None:  # returns None: a forward hook's value replaces the output
        self._stack.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            module, kind = self._stack[-1] if self._stack else ("", "")
            self.records.append(Saved(module, kind, t.dtype, tuple(t.shape), storage.nbytes()))
        return t

    def bytes_by(self, key) -> dict:
        """Total bytes grouped by key(record)."""
        out: dict = defaultdict(int)
        for r in self.records:
            out[key(r)] += r.nbytes
        return dict(out)
