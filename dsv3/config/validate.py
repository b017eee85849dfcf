"""Cross-field rules of the configuration, checked once before any process does work.

Each rule raises `ConfigError(key, value, allowed)`; the launcher prints its one line and exits 2.
"""
import os
from typing import Any

from dsv3.config.errors import ConfigError
from dsv3.config.post_training import validate_post_training
from dsv3.config.schema import Config

PRECISIONS = ("fp32", "bf16", "fp8")
SCORE_FUNCS = ("sigmoid", "softmax")
DATA_SOURCES = ("stdlib", "shards")
DEVICES = ("auto", "cpu", "cuda")
MOMENT_DTYPES = ("fp32", "bf16")
GROUPED_GEMM_IMPLS = ("auto", "triton", "torch", "reference")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, value, f"must be one of {', '.join(choices)}")


def _positive(cfg_section: Any, prefix: str, names: list[str]) -> None:
    for name in names:
        value = getattr(cfg_section, name)
        _require(value > 0, f"{prefix}.{name}", value, "must be > 0")


def validate_model(m: Any) -> None:
    _positive(m, "model", ["vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                           "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len", "rope_theta",
                           "norm_eps", "init_std"])
    _require(0 <= m.n_dense_layers <= m.n_layers, "model.n_dense_layers", m.n_dense_layers,
             f"must be between 0 and model.n_layers ({m.n_layers})")
    _require(m.n_dense_layers == 0 or m.inter_dim > 0, "model.inter_dim", m.inter_dim,
             "must be > 0 when model.n_dense_layers > 0")
    _require(m.q_lora_rank >= 0, "model.q_lora_rank", m.q_lora_rank, "must be >= 0 (0 = no query compression)")
    _require(m.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", m.qk_rope_head_dim,
             "must be even (RoPE rotates pairs)")
    _require(m.mtp_depth >= 0, "model.mtp_depth", m.mtp_depth, "must be >= 0")
    _one_of("model.score_func", m.score_func, SCORE_FUNCS)
    _require(m.route_scale > 0, "model.route_scale", m.route_scale, "must be > 0")
    has_moe = m.n_layers > m.n_dense_layers or m.mtp_depth > 0
    if has_moe:
        _positive(m, "model", ["moe_inter_dim", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                               "n_limited_groups"])
        _require(m.n_shared_experts >= 0, "model.n_shared_experts", m.n_shared_experts, "must be >= 0")
        _require(m.n_activated_experts <= m.n_routed_experts, "model.n_activated_experts", m.n_activated_experts,
                 f"must be <= model.n_routed_experts ({m.n_routed_experts})")
        _require(m.n_routed_experts % m.n_expert_groups == 0, "model.n_expert_groups", m.n_expert_groups,
                 f"must divide model.n_routed_experts ({m.n_routed_experts}) into equal groups")
        _require(m.n_limited_groups <= m.n_expert_groups, "model.n_limited_groups", m.n_limited_groups,
                 f"must be <= model.n_expert_groups ({m.n_expert_groups})")
        per_group = m.n_routed_experts // m.n_expert_groups
        if m.n_expert_groups > 1:
            # The group score is the sum of the group's top-2 biased scores (official V3 routing).
            _require(per_group >= 2, "model.n_expert_groups", m.n_expert_groups,
                     f"must leave >= 2 experts per group (model.n_routed_experts={m.n_routed_experts})")
        _require(m.n_activated_experts <= m.n_limited_groups * per_group, "model.n_activated_experts",
                 m.n_activated_experts,
                 f"must be <= model.n_limited_groups * experts per group ({m.n_limited_groups * per_group})")
    if m.max_seq_len > m.original_seq_len:
        _require(m.rope_factor >= 1, "model.rope_factor", m.rope_factor, "must be >= 1")
        limit = int(m.original_seq_len * m.rope_factor)
        _require(m.max_seq_len <= limit, "model.max_seq_len", m.max_seq_len,
                 f"YaRN supports at most model.original_seq_len * model.rope_factor = {limit} positions")


def validate_expert_parallel(m: Any, p: Any, dp: int, local_world_size: int) -> None:
    """EP splits every MoE layer's experts into `ep` contiguous slices over consecutive dp ranks."""
    from dsv3.parallel.ep_transport import TRANSPORTS

    _require(p.ep >= 1, "parallel.ep", p.ep, "must be >= 1")
    _one_of("parallel.ep_transport", p.ep_transport, TRANSPORTS)
    # torchrun numbers ranks node by node, and an EP group is ep consecutive ranks from a multiple of ep.
    _require(p.ep == 1 or p.ep_transport != "direct" or local_world_size % p.ep == 0, "parallel.ep_transport",
             p.ep_transport, f"direct needs every EP group ({p.ep} consecutive ranks) inside one node, but a node "
             f"runs {local_world_size} ranks (LOCAL_WORLD_SIZE); use all_to_all or auto across nodes")
    _require(m.n_routed_experts % p.ep == 0, "parallel.ep", p.ep,
             f"must divide model.n_routed_experts ({m.n_routed_experts}): each rank holds an equal slice")
    _require(dp % p.ep == 0, "parallel.ep", p.ep,
             f"must divide the data-parallel size ({dp} = world size / parallel.pp): EP groups are made of "
             "the data-parallel ranks of each pipeline stage")
    _require(p.expert_align >= 1, "parallel.expert_align", p.expert_align, "must be >= 1 (1 = no padding)")
    if p.ep > 1 and m.n_expert_groups > 1:
        # Node-limited routing (V3 §2.1.2): a token uses experts of at most n_limited_groups groups. With
        # contiguous groups and contiguous slices per rank, that bounds the ranks (or nodes of ep/groups
        # ranks) a token is sent to only if group boundaries fall on rank boundaries.
        g = m.n_expert_groups
        _require(g % p.ep == 0 or p.ep % g == 0, "model.n_expert_groups", g,
                 f"must be a multiple or a divisor of parallel.ep ({p.ep}), so that expert groups align with "
                 "the ranks holding them (node-limited routing)")


def validate_overlap(p: Any) -> None:
    """parallel.overlap=true needs something to overlap: expert all-to-alls inside F&B pairs."""
    from dsv3.parallel.pipeline.config import PAIR_SCHEDULES

    if p.overlap is not True:
        return
    _require(p.ep > 1, "parallel.overlap", p.overlap,
             f"true needs expert parallelism (parallel.ep > 1; got {p.ep}): it hides the expert all-to-alls; "
             "use false or null")
    _require(p.pp == 1 or p.pp_schedule in PAIR_SCHEDULES, "parallel.overlap", p.overlap,
             f"true needs F&B pairs: parallel.pp=1 (accumulation pairs) or parallel.pp_schedule one of "
             f"{', '.join(PAIR_SCHEDULES)} (got pp={p.pp}, {p.pp_schedule}); use false or null")


def validate_pipeline_parallel(m: Any, p: Any, t: Any) -> None:
    """The pipeline rules that need no world size (the schedule's own rules first, where
    `parallel.microbatches` is given; with -1 they run in `validate_micro_batches`)."""
    from dsv3.parallel.pipeline.config import SCHEDULE_NAMES, validate_pipeline

    _require(p.pp >= 1, "parallel.pp", p.pp, "must be >= 1 (the number of pipeline ranks)")
    _one_of("parallel.pp_schedule", p.pp_schedule, SCHEDULE_NAMES)
    _require(p.microbatches == -1 or p.microbatches >= 1, "parallel.microbatches", p.microbatches,
             "must be >= 1, or -1 to derive it from the batch sizes")
    if p.pp == 1:
        return
    _require(t.batch_ramp_start == 0, "train.batch_ramp_start", t.batch_ramp_start,
             "must be 0 with parallel.pp > 1: the schedule is built for a fixed number of micro-batches")
    if p.microbatches != -1:
        validate_pipeline(p.pp, p.pp_schedule, p.microbatches, m.n_layers)


def validate_micro_batches(m: Any, p: Any, t: Any, dp: int) -> None:
    """parallel.microbatches is the number of micro-batches of the full global batch per dp rank."""
    from dsv3.parallel.pipeline.config import validate_pipeline

    n = t.global_batch_size // (t.micro_batch_size * dp)
    how = f"train.global_batch_size / (train.micro_batch_size * dp) = {t.global_batch_size} / " \
          f"({t.micro_batch_size} * {dp}) = {n}"
    _require(p.microbatches in (-1, n), "parallel.microbatches", p.microbatches,
             f"must equal {how}, or be -1 to derive it")
    if p.pp > 1 and p.microbatches == -1:
        try:
            validate_pipeline(p.pp, p.pp_schedule, n, m.n_layers)
        except ConfigError as e:
            if e.key != "parallel.microbatches":
                raise
            raise ConfigError(e.key, n, f"{e.allowed}; derived as {how}: change the batch sizes or "
                                        "the schedule") from None


def _check_kernels_run_here(cfg: Config) -> None:
    """The requested expert GEMM implementation must be able to run on this device (no silent fallback)."""
    import torch

    from dsv3.kernels.ops import resolve_grouped_gemm_impl

    # train.device=cuda without a visible GPU is reported by the train.device rule below.
    use_cuda = cfg.train.device in ("cuda", "auto") and torch.cuda.is_available()
    dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32
    try:
        resolve_grouped_gemm_impl(cfg.kernels.grouped_gemm, "cuda" if use_cuda else "cpu", dtype,
                                  fp8=cfg.precision.dtype == "fp8")
    except ValueError as e:
        raise ConfigError("kernels.grouped_gemm", cfg.kernels.grouped_gemm, str(e)) from None


def _shard_meta(key: str, path: Any) -> dict:
    _require(path is not None and os.path.isfile(os.path.join(str(path), "meta.json")), key, path,
             "must be a directory written by launch/prepare_data.py (with meta.json)")
    from dsv3.data.shards import read_meta

    return read_meta(str(path))


def validate_data(d: Any, m: Any, p: Any) -> None:
    _one_of("data.source", d.source, DATA_SOURCES)
    _require(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
             f"must be <= model.max_seq_len ({m.max_seq_len}), the length RoPE/YaRN is built for")
    metas = {}
    if d.blend:
        _require(d.source == "shards" and d.path is None, "data.blend", [b.path for b in d.blend],
                 "replaces data.path: use it with data.source=shards and data.path=null")
        from dsv3.data.blend import blend_counts

        try:
            blend_counts([b.weight for b in d.blend])
        except ValueError as e:
            raise ConfigError("data.blend", [b.weight for b in d.blend], str(e)) from None
        for i, b in enumerate(d.blend):
            metas[f"data.blend[{i}].path"] = _shard_meta(f"data.blend[{i}].path", b.path)
        digests = {key: meta.get("tokenizer_sha256") for key, meta in metas.items()}
        first = next(iter(digests))
        for key, digest in digests.items():
            _require(digest is not None and digest == digests[first], key, d.blend[list(digests).index(key)].path,
                     f"must be tokenized like data.blend[0].path ({d.blend[0].path}): the tokenizers differ (or "
                     "one was prepared by an older version that did not record it)")
    elif d.source == "shards":
        metas["data.path"] = _shard_meta("data.path", d.path)
    if d.tokenizer is not None:
        _require(os.path.isfile(d.tokenizer), "data.tokenizer", d.tokenizer, "must be an existing tokenizer.json")
    _require(0 < d.val_fraction < 0.5, "data.val_fraction", d.val_fraction, "must be in (0, 0.5)")
    _require(0 <= d.fim_rate <= 1, "data.fim_rate", d.fim_rate, "must be in [0, 1] (V3: 0.1)")
    if d.fim_rate > 0 or d.document_masks:
        key = "data.fim_rate" if d.fim_rate > 0 else "data.document_masks"
        for where, meta in metas.items():
            _require(meta.get("format", 1) >= 2, key, getattr(d, key.split(".")[1]),
                     f"needs the document index of shards prepared by this version; {where} has none: prepare it again")
            _require(d.fim_rate == 0 or meta.get("fim_ids") is not None, "data.fim_rate", d.fim_rate,
                     f"the tokenizer of {where} has no FIM sentinels: prepare it again (launch/prepare_data.py "
                     "adds <|fim_begin|>, <|fim_hole|>, <|fim_end|>)")
    _require(not d.document_masks or p.pp == 1, "data.document_masks", d.document_masks,
             "is not supported with pipeline parallelism (parallel.pp > 1) yet")


def validate(cfg: Config, world_size: int = 1, local_world_size: int | None = None) -> None:
    """Check every cross-field rule; raise ConfigError naming the first offending key. `local_world_size`:
    ranks per node (default: all `world_size` ranks on one node)."""
    m, d, t, o, p = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.parallel
    validate_model(m)

    _one_of("precision.dtype", cfg.precision.dtype, PRECISIONS)
    from dsv3.fp8.validate import validate_fp8  # the FP8 recipe's rules (device, options)

    validate_fp8(cfg)
    _one_of("kernels.grouped_gemm", cfg.kernels.grouped_gemm, GROUPED_GEMM_IMPLS)
    _check_kernels_run_here(cfg)

    validate_data(d, m, p)

    _one_of("optim.moment_dtype", o.moment_dtype, MOMENT_DTYPES)
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be between 0 and optim.lr ({o.lr})")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas),
             "must be two numbers in [0, 1)")
    for key in ("warmup_steps", "constant_steps", "decay_steps"):
        _require(getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    for phase in o.tail:
        _require(len(phase) == 2 and phase[0] >= 0 and phase[1] >= 0, "optim.tail", list(o.tail),
                 "must be a list of [steps, lr] pairs")

    validate_pipeline_parallel(m, p, t)
    from dsv3.parallel.pipeline.config import validate_seq_chunks

    validate_seq_chunks(p.pp, p.pp_schedule, p.seq_chunks, cfg.data.seq_len)
    _require(world_size % p.pp == 0, "parallel.pp", p.pp,
             f"must divide the world size ({world_size}): the world is pp x dp ranks")
    dp = world_size // p.pp if p.dp == -1 else p.dp
    _require(dp >= 1 and dp * p.pp == world_size, "parallel.dp", p.dp,
             f"dp * pp must equal the world size ({world_size}); -1 infers dp")
    validate_expert_parallel(m, p, dp, world_size if local_world_size is None else local_world_size)
    validate_overlap(p)

    _require(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0")
    _require(t.micro_batch_size > 0, "train.micro_batch_size", t.micro_batch_size, "must be > 0")
    unit = t.micro_batch_size * dp
    _require(t.global_batch_size > 0 and t.global_batch_size % unit == 0, "train.global_batch_size",
             t.global_batch_size, f"must be a positive multiple of micro_batch_size * dp ({unit})")
    if t.batch_ramp_start:
        _require(0 < t.batch_ramp_start <= t.global_batch_size and t.batch_ramp_start % unit == 0,
                 "train.batch_ramp_start", t.batch_ramp_start,
                 f"must be a multiple of micro_batch_size * dp ({unit}) and <= train.global_batch_size")
        _require(t.batch_ramp_samples > 0, "train.batch_ramp_samples", t.batch_ramp_samples,
                 "must be > 0 when train.batch_ramp_start is set")
    validate_micro_batches(m, p, t, dp)
    _require(t.log_every > 0, "train.log_every", t.log_every, "must be > 0")
    _require(t.val_every >= 0, "train.val_every", t.val_every, "must be >= 0")
    _require(t.val_samples > 0, "train.val_samples", t.val_samples, "must be > 0")
    _one_of("train.device", t.device, DEVICES)
    if t.device == "cuda":
        import torch

        _require(torch.cuda.is_available(), "train.device", t.device, "no CUDA device is visible; use cpu or auto")
    if t.device in ("cuda", "auto"):
        import torch

        # One GPU per local rank (torchrun's LOCAL_WORLD_SIZE): more ranks than GPUs would put two ranks
        # on one device, where NCCL refuses to run (or index a device that does not exist).
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _require(gpus == 0 or local_ranks <= gpus, "train.device", t.device,
                 f"{local_ranks} ranks on this node but {gpus} visible GPU(s): one GPU per rank; start at most "
                 f"{gpus} ranks per node, or use train.device=cpu")
    if t.resume not in ("auto", "none"):
        _require(os.path.isdir(t.resume), "train.resume", t.resume, "must be auto, none or an existing checkpoint")
    _require(t.bias_update_speed >= 0, "train.bias_update_speed", t.bias_update_speed, "must be >= 0")
    _require(t.balance_loss_alpha >= 0, "train.balance_loss_alpha", t.balance_loss_alpha, "must be >= 0")

    validate_post_training(cfg)

    from dsv3.planner.config_rules import hardware_rules

    hardware_rules(cfg)

    c = cfg.checkpoint
    _require(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = only at the end)")
    _require(c.keep >= 0, "checkpoint.keep", c.keep, "must be >= 0 (0 = keep all)")
    if c.init_from is not None:
        _require(os.path.isdir(c.init_from), "checkpoint.init_from", c.init_from,
                 "must be a dsv3 checkpoint or a Hugging Face DeepseekV3 directory")
