"""Checkpoints in `torch.distributed.checkpoint` format (reshardable), written atomically, verifiable,
and loaded without unpickling code.

Layout: `<dir>/step_00000120/` holds the DCP files (model, optimizer, train state), `rng_rank{r}.pt`
per rank, `config.yaml`, the run's `tokenizer.json` (so an export is self-contained) and
`manifest.json` (every file's size and SHA-256: `dsv3.train.manifest`). A save is written into
`step_00000120.tmp/`, its files are fsync'ed and listed in the manifest, and the directory is renamed
when every rank has finished, so a crash mid-save leaves only a `.tmp` directory, which is never
picked up. Sharded parameters (expert slices under expert parallelism) and their optimizer moments are stored
by their global shape, so a checkpoint loads under any plan. The optimizer state is flattened to one
entry per parameter name ("state.<name>.exp_avg", "param_groups.<name>.lr"): a pipeline rank holds
only its stages' parameters, and DCP merges per-name entries from all ranks (it keeps one copy of an
entry several ranks write, so a nested `param_groups` list would survive from one rank only).

Loading trusts nothing in the files: DCP's `.metadata` (a pickle) is read by an unpickler that knows
only DCP's own metadata classes, its non-tensor entries and the RNG files load with
`torch.load(weights_only=True)` (RNG states are stored as tensors and numbers), so a checkpoint from
someone else cannot run code.
"""
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from typing import Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dsv3.parallel.mesh import barrier
from dsv3.train import manifest

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load that it is "assuming the intent" of a single process: it is.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: damaged, or holding something other than data."""


class ShardedState(Protocol):
    """How a parallel plan (dsv3.parallel.plan.Plan) maps this rank's state dicts to the global ones:
    sharded tensors become DTensors for DCP, which then reshards across plans."""

    def to_global(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]: ...

    def to_local(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]: ...


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def checkpoints(root: str) -> list[str]:
    """The complete (committed) checkpoints under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))), reverse=True)
    return [step_dir(root, s) for s in steps]


def latest_checkpoint(root: str) -> Optional[str]:
    """The complete checkpoint with the highest step under `root`, or None (not verified: see `manifest.verify`)."""
    found = checkpoints(root)
    return found[0] if found else None


def verify_checkpoint(path: str) -> list[str]:
    """What is wrong with a checkpoint's files (empty: intact), by its manifest. One written before
    manifests existed is accepted with a warning (its commit was still the atomic rename).
    A collective under torch.distributed: the ranks share the hashing."""
    problems = manifest.verify(path)
    if problems == [f"no {manifest.MANIFEST}"]:
        log.warning("%s has no %s (saved by an older dsv3): its files cannot be verified", path, manifest.MANIFEST)
        return []
    return problems


def describe_damage(path: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return f"{path} is damaged: {shown}"


# -- RNG states, as tensors and numbers (loadable with weights_only=True) ---------------------------------
def _rng_state() -> dict:
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
                    config_yaml: str, keep: int = 0, plan: Optional[ShardedState] = None,
                    tokenizer: Optional[str] = None) -> str:
    """Write `<root>/step_XXXXXXXX` (a collective: every rank calls it). `tokenizer`: a tokenizer.json
    copied along, so that the checkpoint can be exported on its own."""
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
        if tokenizer is not None:
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))
    barrier()
    manifest.write_manifest(tmp)  # sizes, checksums, fsync: before the commit
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit point
        manifest.fsync_dir(root)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: str, keep: int) -> None:
    if keep <= 0:
        return
    for path in checkpoints(root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


# -- loading: nothing in a checkpoint may run code --------------------------------------------------------
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_SAFE_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
                 ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                 ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its `.metadata`; a plain unpickle of a foreign file could call anything. Only DCP's
    metadata classes, torch sizes/dtypes/layouts and paths are let through."""

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a pickled reference to {module}.{name}, which DCP metadata never holds")


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor entries (step counts, learning rates) are unpickled
    with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _check_metadata(path: str):
    """The checkpoint's DCP metadata, read safely."""
    meta = os.path.join(path, ".metadata")
    try:
        with open(meta, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a dsv3 checkpoint: it has no DCP .metadata file") from None
    except Exception as e:  # a damaged or foreign pickle: any unpickling error
        raise CheckpointError(f"{meta} cannot be read safely: {e.__class__.__name__}: {e}") from None


def _dcp_load(state: dict, path: str) -> None:
    _check_metadata(path)
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyPlanner())


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    plan: Optional[ShardedState] = None, optional_train: Optional[dict] = None) -> dict:
    """Restore model (and optimizer, RNG) in place; returns the saved train state (step, samples consumed).
    `plan`: the parallel plan the model was sharded by (None: the model holds every parameter whole).
    `optional_train`: more train-state entries to read, each with a template of its tensors (fp16's loss
    scaler); an entry the checkpoint does not hold (a run resumed in another precision) is left out of
    the result."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if optimizer is None:
        model_sd = model.state_dict()
        if plan is not None:
            model_sd, _ = plan.to_global(model_sd, {})
        _dcp_load({"model": model_sd}, path)
        if plan is not None:
            model_sd, _ = plan.to_local(model_sd, {})
        model.load_state_dict(model_sd)
        return {}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    if plan is not None:
        model_sd, optim_sd = plan.to_global(model_sd, optim_sd)
    state = {"model": model_sd, "optim": optim_sd, "train": {"step": 0, "consumed_samples": 0}}
    saved_keys = set(_check_metadata(path).state_dict_metadata)
    for name, template in (optional_train or {}).items():
        if any(k.startswith(f"train.{name}.") or k == f"train.{name}" for k in saved_keys):
            state["train"][name] = template
    _dcp_load(state, path)
    if plan is not None:
        state["model"], state["optim"] = plan.to_local(state["model"], state["optim"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_OPTIONS)
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        try:
            rng = torch.load(rng_file, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{rng_file} holds more than RNG states (refused by weights_only loading: "
                                  f"{str(e).splitlines()[0]}); if an older dsv3 wrote it (numpy arrays), delete "
                                  f"the checkpoint's rng_rank*.pt files to resume without its RNG streams") from None
        _set_rng_state(rng)
    else:
        log.warning("%s has no RNG state for rank %d (saved with fewer ranks); RNG streams restart", path, rank)
    return state["train"]
