"""Which checkpoint a run continues from, and whether the new config may continue it.

`train.resume=auto` takes the newest checkpoint whose files match its manifest; a damaged one is
named (path and file) and the one before it is tried. An explicit `train.resume=<path>` that is
damaged is a config error (exit 2): the user asked for that one. When every checkpoint of a
directory is damaged, `auto` refuses too, rather than start over and later prune the evidence.

The saved `config.yaml` is compared key by key with the new config:
- FIXED keys (the model's shapes and vocabulary, the data a sample index points into) cannot change:
  the weights would not load, or `consumed_samples` would point into other data;
- FREE keys (how long, how often to log/evaluate/save, the parallel plan, kernels, devices) may:
  a checkpoint is stored by global shapes and reshards onto any plan;
- any other change (learning rate, seed, batch size, precision, ...) must be listed in
  `train.resume_allow_changes` (a key, or a section such as `optim`).
"""
import logging
from typing import Any, Iterable, Optional

import yaml
from omegaconf import OmegaConf

from dsv3.config.errors import ConfigError
from dsv3.config.schema import Config
from dsv3.train.checkpoint import checkpoints, describe_damage, verify_checkpoint
from dsv3.train.weights import ARCHITECTURE_FIELDS

log = logging.getLogger("dsv3")

# The weights' shapes (what `checkpoint.init_from` checks too) and the identity of the data.
FIXED = tuple(f"model.{k}" for k in ARCHITECTURE_FIELDS) + (
    "model.mtp_depth", "data.source", "data.path", "data.tokenizer", "data.seq_len", "data.val_fraction")
# Sections and keys that may differ between the run that saved and the one that resumes.
FREE = ("run_name", "parallel", "kernels", "checkpoint", "data.cache_dir", "train.max_steps", "train.log_every",
        "train.val_every", "train.val_samples", "train.micro_batch_size", "train.resume",
        "train.resume_allow_changes", "train.on_nonfinite", "train.max_consecutive_skips", "train.device",
        "train.threads")


def _covers(entries: Iterable[str], key: str) -> bool:
    """Whether `key` is one of `entries` or inside one of them (a section)."""
    return any(key == e or key.startswith(e + ".") for e in entries)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists are values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def config_tree(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False)


def schema_keys() -> set[str]:
    return set(flatten(config_tree(Config())))


def changed_keys(saved: dict, now: dict, defaults: dict) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, new value) for every key of the schema that differs. A key the saved config
    lacks (written before the key existed) counts as its default."""
    out = {}
    for key, value in now.items():
        before = saved.get(key, defaults.get(key))
        if before != value:
            out[key] = (before, value)
    return out


def _list(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def check_config_change(saved_yaml: str, cfg: Config, source: str) -> None:
    """Raise ConfigError if `cfg` may not continue the run whose `config.yaml` is `saved_yaml`; log the
    changes it accepts."""
    now = flatten(config_tree(cfg))
    changes = changed_keys(flatten(yaml.safe_load(saved_yaml) or {}), now, flatten(config_tree(Config())))
    fixed = {k: v for k, v in changes.items() if _covers(FIXED, k)}
    if fixed:
        raise ConfigError("train.resume", cfg.train.resume,
                          f"{source} was trained with another model or data, which cannot change when resuming: "
                          f"{_list(fixed)}; start a new run (another run_name, or train.resume=none; "
                          f"checkpoint.init_from={source} starts it from these weights)")
    allowed = list(cfg.train.resume_allow_changes)
    refused = {k: v for k, v in changes.items() if not _covers(FREE, k) and not _covers(allowed, k)}
    if refused:
        keys = ",".join(refused)
        raise ConfigError("train.resume_allow_changes", allowed,
                          f"resuming {source} with a changed {_list(refused)}: to continue that run with the "
                          f"new values, list them: train.resume_allow_changes=[{keys}]")
    shown = {k: v for k, v in changes.items() if not _covers(("train.resume", "train.resume_allow_changes"), k)}
    if shown:
        log.info("resuming %s with config changes: %s", source, _list(shown))


def validate_allow_changes(entries: list[str]) -> None:
    """`train.resume_allow_changes` names keys or sections of the schema, none of them FIXED."""
    keys = schema_keys()
    for e in entries:
        if not any(_covers([e], k) for k in keys):
            raise ConfigError("train.resume_allow_changes", list(entries),
                              f"{e!r} is no config key or section (e.g. optim.lr, optim, train.seed)")
        if _covers(FIXED, e) or any(_covers([e], k) for k in FIXED):
            raise ConfigError("train.resume_allow_changes", list(entries),
                              f"{e!r} covers keys that can never change on resume ({', '.join(FIXED[:3])}, ...)")


def checkpoint_to_resume(cfg: Config) -> Optional[str]:
    """The checkpoint this run continues from (None: a fresh start), verified, its config compared with
    `cfg`. Raises ConfigError for what the user must decide. A collective under torch.distributed."""
    t = cfg.train
    if t.resume == "none":
        return None
    if t.resume != "auto":
        problems = verify_checkpoint(t.resume)
        if problems:
            raise ConfigError("train.resume", t.resume, describe_damage(t.resume, problems) +
                              "; give an intact checkpoint, or auto for the newest intact one")
        path = t.resume
    else:
        found = checkpoints(cfg.checkpoint.dir)
        path = None
        for candidate in found:
            problems = verify_checkpoint(candidate)
            if not problems:
                path = candidate
                break
            log.warning("%s; falling back to the checkpoint before it", describe_damage(candidate, problems))
        if found and path is None:
            raise ConfigError("train.resume", "auto",
                              f"every checkpoint in {cfg.checkpoint.dir} is damaged ({len(found)}, see above); "
                              "train.resume=none starts over (the damaged ones stay where they are)")
        if path is None:
            return None
    with open(f"{path}/config.yaml") as f:
        check_config_change(f.read(), cfg, path)
    return path
