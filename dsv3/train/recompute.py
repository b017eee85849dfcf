"""Activation checkpointing: chosen modules keep only their inputs and recompute the rest in the backward.

Applied from outside the model, like the FP8 recipe and the parallel plan: each chosen module's
forward is wrapped in torch.utils.checkpoint (non-reentrant, so it composes with the pipeline
executor's split backward, FP8's saved tensors and ZeRO's gradient hooks); parameter names do not
change, so checkpoints, pipeline cuts and expert slices see the same model.

    none       keep every activation
    full       every transformer block (the MTP modules' included): a block keeps only its input
    moe        only the MoE layers (router, dispatch, experts, combine, shared expert), the largest
               activations of a fine-grained MoE (K copies of every token)
    attention  only MLA (its up-projections and the attention core)

The recomputation is numerically the forward again (same inputs, same kernels): losses and gradients
are bit-identical to no checkpointing. One side effect of a forward must not happen twice: the
router's token counts (the aux-loss-free bias update reads them), so a recomputed router takes its
counts back out (exact: integer counts in fp32).
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3.model.mla import MLA
from dsv3.model.moe import MoE, Gate
from dsv3.model.transformer import Block

MODES = {"none": (), "full": (Block,), "moe": (MoE,), "attention": (MLA,)}

# Whether this thread is recomputing (F&B pairs run a forward and a backward on two threads).
_state = threading.local()


@contextmanager
def _recomputing():
    _state.active = True
    try:
        yield
    finally:
        _state.active = False


def _contexts():
    return nullcontext(), _recomputing()


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():     # evaluation: nothing is kept anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def _uncount_recomputed_routing(gate: Gate, inputs, outputs) -> None:
    if getattr(_state, "active", False) and gate.training:
        indices = outputs[1]
        with torch.no_grad():
            gate.expert_load -= torch.bincount(indices.flatten(), minlength=gate.expert_load.numel())


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Wrap the modules `mode` names; returns how many. Call once, before the plan cuts the model."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: must be one of {', '.join(MODES)}")
    kinds = MODES[mode]
    if not kinds:
        return 0
    wrapped = 0
    for module in model.modules():
        if isinstance(module, kinds):
            # An instance attribute shadows the class's forward; nn.Module.__call__ calls it.
            module.forward = functools.partial(_checkpointed, module.forward)
            wrapped += 1
    for module in model.modules():
        if isinstance(module, Gate):
            module.register_forward_hook(_uncount_recomputed_routing)
    return wrapped
