"""Config rules of the training run (`precision.dtype`, `optim.*`, `train.*`, `logging.*`, `checkpoint.*`), registered
in dsv3/config/rules.py. Checkpoints the config names are checked here too: their files (sizes against
the manifest; the checksums when the ranks load them) and, for `checkpoint.init_from`, the architecture."""
import os

from dsv3.config.precision import PRECISIONS, device_type
from dsv3.config.rules import World, one_of, require
from dsv3.config.schema import Config

DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("skip", "stop")
WANDB_MODES = ("online", "offline")


def precision_and_optim_rules(cfg: Config, world: World) -> None:
    from dsv3.train.optim import DTYPES

    one_of("precision.dtype", cfg.precision.dtype, PRECISIONS)
    if cfg.precision.dtype == "bf16" and device_type(cfg.train.device) == "cuda":
        import torch

        cap = torch.cuda.get_device_capability()
        require(cap >= (8, 0), "precision.dtype", "bf16",
                f"needs bf16 tensor cores (CUDA compute capability 8.0+: Ampere or newer); "
                f"{torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}: use precision.dtype=fp16 "
                f"(autocast with dynamic loss scaling) or fp32")
    if cfg.precision.dtype == "fp16":
        s = cfg.precision.loss_scale
        require(s.min > 0, "precision.loss_scale.min", s.min, "must be > 0")
        require(s.init >= s.min, "precision.loss_scale.init", s.init,
                f"must be >= precision.loss_scale.min ({s.min})")
        require(s.growth_interval > 0, "precision.loss_scale.growth_interval", s.growth_interval, "must be > 0")
    o = cfg.optim
    one_of("optim.moment_dtype", o.moment_dtype, tuple(DTYPES))
    require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be between 0 and optim.lr ({o.lr})")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas),
            "must be two numbers in [0, 1)")
    for key in ("warmup_steps", "constant_steps", "decay_steps"):
        require(getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), "must be >= 0")
    require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    require(0 < o.layer_lr_decay <= 1, "optim.layer_lr_decay", o.layer_lr_decay,
            "must be in (0, 1] (1 = one learning rate for all layers)")
    for phase in o.tail:
        require(len(phase) == 2 and phase[0] >= 0 and phase[1] >= 0, "optim.tail", list(o.tail),
                "must be a list of [steps, lr] pairs")


def train_rules(cfg: Config, world: World) -> None:
    t = cfg.train
    require(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0")
    require(t.log_every > 0, "train.log_every", t.log_every, "must be > 0")
    require(t.val_every >= 0, "train.val_every", t.val_every, "must be >= 0")
    require(t.val_samples > 0, "train.val_samples", t.val_samples, "must be > 0")
    require(t.bias_update_speed >= 0, "train.bias_update_speed", t.bias_update_speed, "must be >= 0")
    require(t.balance_loss_alpha >= 0, "train.balance_loss_alpha", t.balance_loss_alpha, "must be >= 0")
    one_of("train.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    require(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", t.max_consecutive_skips, "must be >= 1")
    one_of("train.device", t.device, DEVICES)
    if t.device == "cuda":
        import torch

        require(torch.cuda.is_available(), "train.device", t.device, "no CUDA device is visible; use cpu or auto")
    if t.device in ("cuda", "auto"):
        import torch

        # One GPU per local rank (torchrun's LOCAL_WORLD_SIZE): more ranks than GPUs would put two ranks
        # on one device, where NCCL refuses to run (or index a device that does not exist).
        local_ranks = world.local_size
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        require(gpus == 0 or local_ranks <= gpus, "train.device", t.device,
                f"{local_ranks} ranks on this node but {gpus} visible GPU(s): one GPU per rank; start at most "
                f"{gpus} ranks per node, or use train.device=cpu")


def _checkpoint_files(key: str, path: str) -> None:
    """Every file of a named checkpoint's manifest is there with its size (the checksums are compared
    when the ranks load it, sharing the work)."""
    from dsv3.train.manifest import MANIFEST, verify

    problems = [p for p in verify(path, checksums=False, collective=False) if p != f"no {MANIFEST}"]
    require(not problems, key, path, f"is damaged: {'; '.join(problems[:3])}")


def checkpoint_rules(cfg: Config, world: World) -> None:
    t, c = cfg.train, cfg.checkpoint
    if t.resume not in ("auto", "none"):
        require(os.path.isdir(t.resume), "train.resume", t.resume, "must be auto, none or an existing checkpoint")
        _checkpoint_files("train.resume", t.resume)
    from dsv3.train.resume import validate_allow_changes

    validate_allow_changes(list(t.resume_allow_changes))
    require(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = only at the end)")
    require(c.keep >= 0, "checkpoint.keep", c.keep, "must be >= 0 (0 = keep all)")
    if c.init_from is not None:
        require(os.path.isdir(c.init_from), "checkpoint.init_from", c.init_from,
                "must be a dsv3 checkpoint or a Hugging Face DeepseekV3 directory")
        from dsv3.model.hf_format import read_hf_config
        from dsv3.train.weights import architecture_differences, is_hf_directory, model_config_of

        if is_hf_directory(c.init_from):
            kind = read_hf_config(c.init_from).get("model_type")
            require(kind == "deepseek_v3", "checkpoint.init_from", c.init_from,
                    f"holds a {kind!r} model; a Hugging Face directory must hold a deepseek_v3 one")
            require(any(n.endswith(".safetensors") for n in os.listdir(c.init_from)), "checkpoint.init_from",
                    c.init_from, "has a config.json but no *.safetensors weights")
        else:
            require(os.path.isfile(os.path.join(c.init_from, "config.yaml")), "checkpoint.init_from", c.init_from,
                    "must be a dsv3 checkpoint (with config.yaml) or a Hugging Face directory (with config.json)")
            _checkpoint_files("checkpoint.init_from", c.init_from)
        differences = architecture_differences(cfg.model, model_config_of(c.init_from))
        require(not differences, "checkpoint.init_from", c.init_from,
                f"holds weights of another architecture: {differences} (the config's value first)")


def observability_rules(cfg: Config, world: World) -> None:
    """What a run shows of itself: the profiler window, torch.compile, W&B, the MFU peak."""
    t, lg = cfg.train, cfg.logging
    steps = list(t.profile_steps)
    if steps:
        require(len(steps) == 2 and 1 <= steps[0] <= steps[1], "train.profile_steps", steps,
                "must be [] (off) or [a, b] with 1 <= a <= b (steps are counted from 1, as in the progress line)")
        require(steps[0] <= t.max_steps, "train.profile_steps", steps,
                f"must start at or before train.max_steps ({t.max_steps})")
    require(not (t.compile and cfg.precision.dtype == "fp8"), "train.compile", t.compile,
            "is not supported with precision=fp8 yet (the FP8 modules are not compiled); use precision=bf16 or "
            "fp32 with train.compile=true")
    if lg.wandb:
        from dsv3.train.wandb_sink import wandb_available

        require(wandb_available(), "logging.wandb", lg.wandb, "needs the wandb package, which is not installed: "
                "pip install wandb (or set logging.wandb=false)")
    one_of("logging.wandb_mode", lg.wandb_mode, WANDB_MODES)
    require(lg.peak_tflops >= 0, "logging.peak_tflops", lg.peak_tflops, "must be >= 0 (0 = datasheet or measured)")


RULES = (precision_and_optim_rules, train_rules, observability_rules, checkpoint_rules)
