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
are bit-identical to no checkpointing. What a forward records must not be recorded twice: the expert
counts and balance losses it writes into the step's `StepAux` (the aux-loss-free bias update and the
log read them), so a recomputed module writes into a throwaway copy (`StepAux.fresh()`) that keeps the
forward's inputs, forced routing included.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3.model.mla import MLA
from dsv3.model.moe import MoE
from dsv3.model.step_aux import StepAux
from dsv3.model.transformer import Block

MODES = {"none": (), "full": (Block,), "moe": (MoE,), "attention": (MLA,)}

# Whether this thread is recomputing (F&B pairs run a forward and a backward on two threads).
_state = threading.local()


class _Recomputing:
    """Marks this thread as recomputing. Re-enterable: a backward split into I and W (zero-bubble
    schedules, DualPipe) recomputes a module once per autograd call with the same context object,
    which a generator-based context manager cannot be entered twice for."""

    def __enter__(self):
        _state.active = True

    def __exit__(self, *exc):
        _state.active = False


def _contexts():
    return nullcontext(), _Recomputing()


def _throwaway(x):
    # Records nothing twice, but routes as the first forward did: forced routing (RL's router replay)
    # is an input of this forward, and a recomputation that routed otherwise would compute other gradients.
    return dataclasses.replace(x.fresh(), forced_experts=x.forced_experts) if isinstance(x, StepAux) else x


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():     # evaluation: nothing is kept anyway
        return forward(*args, **kwargs)

    def run(*a, **k):
        if getattr(_state, "active", False):   # recomputing: the first forward has recorded already
            a, k = tuple(map(_throwaway, a)), {n: _throwaway(v) for n, v in k.items()}
        return forward(*a, **k)

    return checkpoint(run, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


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
    return wrapped


def recomputes(module: nn.Module) -> bool:
    """Whether `module` holds a module `apply_activation_checkpointing` wrapped."""
    return any(isinstance(m.__dict__.get("forward"), functools.partial) and m.forward.func is _checkpointed
               for m in module.modules())
