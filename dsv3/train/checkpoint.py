"""Checkpoints in `torch.distributed.checkpoint` format (reshardable), written atomically.

Layout: `<dir>/step_00000120/` holds the DCP files (model, optimizer, train state), `rng_rank{r}.pt`
per rank, and `config.yaml`. A save is written into `step_00000120.tmp/` and renamed when every
rank has finished, so a crash mid-save leaves only a `.tmp` directory, which is never picked up.
Sharded parameters (expert slices under expert parallelism) and their optimizer moments are stored
by their global shape, so a checkpoint loads under any plan. The optimizer state is flattened to one
entry per parameter name ("state.<name>.exp_avg", "param_groups.<name>.lr"): a pipeline rank holds
only its stages' parameters, and DCP merges per-name entries from all ranks (it keeps one copy of an
entry several ranks write, so a nested `param_groups` list would survive from one rank only).
"""
import logging
import os
import re
import shutil
import warnings
from typing import Optional, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dsv3.parallel.mesh import barrier

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load that it is "assuming the intent" of a single process: it is.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ShardedState(Protocol):
    """How a parallel plan (dsv3.parallel.plan.Plan) maps this rank's state dicts to the global ones:
    sharded tensors become DTensors for DCP, which then reshards across plans."""

    def to_global(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]: ...

    def to_local(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]: ...


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def latest_checkpoint(root: str) -> Optional[str]:
    """The complete checkpoint with the highest step under `root`, or None."""
    if not os.path.isdir(root):
        return None
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return step_dir(root, max(steps)) if steps else None


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
                    config_yaml: str, keep: int = 0, plan: Optional[ShardedState] = None) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = step_dir(root, step), step_dir(root, step) + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save
        os.makedirs(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    if plan is not None:
        model_sd, optim_sd = plan.to_global(model_sd, optim_sd)
    dcp.save({"model": model_sd, "optim": optim_sd, "train": dict(train_state)}, checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit point
        _prune(root, keep)
    barrier()
    return final


def _prune(root: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    for s in steps[:-keep]:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    plan: Optional[ShardedState] = None) -> dict:
    """Restore model (and optimizer, RNG) in place; returns the saved train state (step, samples consumed).
    `plan`: the parallel plan the model was sharded by (None: the model holds every parameter whole)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if optimizer is None:
        model_sd = model.state_dict()
        if plan is not None:
            model_sd, _ = plan.to_global(model_sd, {})
        dcp.load({"model": model_sd}, checkpoint_id=path)
        if plan is not None:
            model_sd, _ = plan.to_local(model_sd, {})
        model.load_state_dict(model_sd)
        return {}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    if plan is not None:
        model_sd, optim_sd = plan.to_global(model_sd, optim_sd)
    state = {"model": model_sd, "optim": optim_sd, "train": {"step": 0, "consumed_samples": 0}}
    dcp.load(state, checkpoint_id=path)
    if plan is not None:
        state["model"], state["optim"] = plan.to_local(state["model"], state["optim"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_OPTIONS)
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (saved with fewer ranks); RNG streams restart", path, rank)
    return state["train"]
