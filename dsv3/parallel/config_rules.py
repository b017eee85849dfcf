"""Config rules of the parallel plan (`parallel.*`) and of how the global batch splits over it, registered in
dsv3/config/rules.py. The world is pp x dp ranks; expert parallelism lives inside the dp ranks."""
from dsv3.config.errors import ConfigError
from dsv3.config.rules import World, one_of, require
from dsv3.config.schema import Config
from dsv3.parallel.pipeline.config import SCHEDULE_NAMES, validate_pipeline, validate_seq_chunks


def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // p.pp if p.dp == -1 else p.dp


def pipeline_rules(cfg: Config, world: World) -> None:
    """The pipeline rules that need no batch split (the schedule's own rules first, where
    `parallel.microbatches` is given; with -1 they run in `micro_batch_rules`)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    require(p.pp >= 1, "parallel.pp", p.pp, "must be >= 1 (the number of pipeline ranks)")
    one_of("parallel.pp_schedule", p.pp_schedule, SCHEDULE_NAMES)
    require(p.microbatches == -1 or p.microbatches >= 1, "parallel.microbatches", p.microbatches,
            "must be >= 1, or -1 to derive it from the batch sizes")
    validate_seq_chunks(p.pp, p.pp_schedule, p.seq_chunks, cfg.data.seq_len)
    if p.pp > 1:
        require(t.batch_ramp_start == 0, "train.batch_ramp_start", t.batch_ramp_start,
                "must be 0 with parallel.pp > 1: the schedule is built for a fixed number of micro-batches")
        if p.microbatches != -1:
            validate_pipeline(p.pp, p.pp_schedule, p.microbatches, m.n_layers)
    require(world.size % p.pp == 0, "parallel.pp", p.pp,
            f"must divide the world size ({world.size}): the world is pp x dp ranks")
    dp = data_parallel_size(cfg, world.size)
    require(dp >= 1 and dp * p.pp == world.size, "parallel.dp", p.dp,
            f"dp * pp must equal the world size ({world.size}); -1 infers dp")


def expert_parallel_rules(cfg: Config, world: World) -> None:
    """EP splits every MoE layer's experts into `ep` contiguous slices over consecutive dp ranks."""
    from dsv3.parallel.ep_transport import TRANSPORTS

    m, p = cfg.model, cfg.parallel
    dp = data_parallel_size(cfg, world.size)
    require(p.ep >= 1, "parallel.ep", p.ep, "must be >= 1")
    one_of("parallel.ep_transport", p.ep_transport, TRANSPORTS)
    # torchrun numbers ranks node by node, and an EP group is ep consecutive ranks from a multiple of ep.
    require(p.ep == 1 or p.ep_transport != "direct" or world.local_size % p.ep == 0, "parallel.ep_transport",
            p.ep_transport, f"direct needs every EP group ({p.ep} consecutive ranks) inside one node, but a node "
            f"runs {world.local_size} ranks (LOCAL_WORLD_SIZE); use all_to_all or auto across nodes")
    require(m.n_routed_experts % p.ep == 0, "parallel.ep", p.ep,
            f"must divide model.n_routed_experts ({m.n_routed_experts}): each rank holds an equal slice")
    require(dp % p.ep == 0, "parallel.ep", p.ep,
            f"must divide the data-parallel size ({dp} = world size / parallel.pp): EP groups are made of "
            "the data-parallel ranks of each pipeline stage")
    require(p.expert_align >= 1, "parallel.expert_align", p.expert_align, "must be >= 1 (1 = no padding)")
    if p.ep > 1 and m.n_expert_groups > 1:
        # Node-limited routing (V3 §2.1.2): a token uses experts of at most n_limited_groups groups. With
        # contiguous groups and contiguous slices per rank, that bounds the ranks (or nodes of ep/groups
        # ranks) a token is sent to only if group boundaries fall on rank boundaries.
        g = m.n_expert_groups
        require(g % p.ep == 0 or p.ep % g == 0, "model.n_expert_groups", g,
                f"must be a multiple or a divisor of parallel.ep ({p.ep}), so that expert groups align with "
                "the ranks holding them (node-limited routing)")


def overlap_rules(cfg: Config, world: World) -> None:
    """parallel.overlap=true needs something to overlap: expert all-to-alls inside F&B pairs."""
    from dsv3.parallel.pipeline.config import PAIR_SCHEDULES

    p = cfg.parallel
    if p.overlap is not True:
        return
    require(p.ep > 1, "parallel.overlap", p.overlap,
            f"true needs expert parallelism (parallel.ep > 1; got {p.ep}): it hides the expert all-to-alls; "
            "use false or null")
    require(p.pp == 1 or p.pp_schedule in PAIR_SCHEDULES, "parallel.overlap", p.overlap,
            f"true needs F&B pairs: parallel.pp=1 (accumulation pairs) or parallel.pp_schedule one of "
            f"{', '.join(PAIR_SCHEDULES)} (got pp={p.pp}, {p.pp_schedule}); use false or null")


def batch_split_rules(cfg: Config, world: World) -> None:
    """The global batch splits into equal micro-batches over the dp ranks; parallel.microbatches is the
    number of micro-batches of the full global batch per dp rank."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = data_parallel_size(cfg, world.size)
    require(t.micro_batch_size > 0, "train.micro_batch_size", t.micro_batch_size, "must be > 0")
    unit = t.micro_batch_size * dp
    require(t.global_batch_size > 0 and t.global_batch_size % unit == 0, "train.global_batch_size",
            t.global_batch_size, f"must be a positive multiple of micro_batch_size * dp ({unit})")
    if t.batch_ramp_start:
        require(0 < t.batch_ramp_start <= t.global_batch_size and t.batch_ramp_start % unit == 0,
                "train.batch_ramp_start", t.batch_ramp_start,
                f"must be a multiple of micro_batch_size * dp ({unit}) and <= train.global_batch_size")
        require(t.batch_ramp_samples > 0, "train.batch_ramp_samples", t.batch_ramp_samples,
                "must be > 0 when train.batch_ramp_start is set")
    n = t.global_batch_size // unit
    how = f"train.global_batch_size / (train.micro_batch_size * dp) = {t.global_batch_size} / " \
          f"({t.micro_batch_size} * {dp}) = {n}"
    require(p.microbatches in (-1, n), "parallel.microbatches", p.microbatches,
            f"must equal {how}, or be -1 to derive it")
    if p.pp > 1 and p.microbatches == -1:
        try:
            validate_pipeline(p.pp, p.pp_schedule, n, m.n_layers)
        except ConfigError as e:
            if e.key != "parallel.microbatches":
                raise
            raise ConfigError(e.key, n, f"{e.allowed}; derived as {how}: change the batch sizes or "
                                        "the schedule") from None


ZERO_STAGES = (0, 1, 2)


def zero_rules(cfg: Config, world: World) -> None:
    """ZeRO through DeepSpeed (dsv3/parallel/zero.py); what DeepSpeed cannot do is refused here."""
    p, o = cfg.parallel, cfg.optim
    require(p.zero in ZERO_STAGES, "parallel.zero", p.zero,
            "must be 0 (no sharding), 1 (optimizer state sharded) or 2 (gradients too); ZeRO-3 is not supported")
    if p.zero == 0 and not p.offload_optimizer:
        return
    key = "parallel.zero" if p.zero else "parallel.offload_optimizer"
    value = p.zero if p.zero else p.offload_optimizer
    # ZeRO-2 reduce-scatters each gradient into its dp partition inside the backward's hooks; tensors
    # several pipeline ranks hold need their gradients summed over those ranks first, and the executor's
    # split backward fills weight gradients outside those hooks (DeepSpeed's pipeline engine refuses
    # ZeRO-2 too).
    require(p.zero != 2 or p.pp == 1, "parallel.zero", p.zero,
            f"2 is not supported with pipeline parallelism (parallel.pp={p.pp}): use parallel.zero=1")
    # fp16's dynamic loss scale lives in the trainer (it skips overflowing steps); DeepSpeed's optimizer
    # would have to unscale, skip and reset its partitions with it. Not wired: refused, not ignored.
    require(cfg.precision.dtype != "fp16", key, value,
            "is not supported with precision.dtype=fp16 (the loss scale is not passed to DeepSpeed's ZeRO "
            "optimizer): use precision.dtype=bf16 or fp32 with ZeRO and optimizer offload")
    # the ZeRO optimizer builds its own parameter groups (experts x decay), one learning rate each
    require(o.layer_lr_decay == 1.0, key, value,
            f"is not supported with optim.layer_lr_decay={o.layer_lr_decay} (the ZeRO optimizer's parameter groups "
            "have one learning rate): use optim.layer_lr_decay=1 with ZeRO and optimizer offload")
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means it cannot run
        raise ConfigError(key, value, f"needs DeepSpeed, which cannot be imported here ({type(e).__name__}: {e}); "
                                      "pip install 'deepspeed>=0.19,<0.20' ninja") from None
    if p.offload_optimizer:
        require(o.moment_dtype == "fp32", "optim.moment_dtype", o.moment_dtype,
                "must be fp32 with parallel.offload_optimizer=true: DeepSpeed's CPU Adam keeps its moments in "
                "the master weights' dtype (fp32); bf16 moments need parallel.offload_optimizer=false")
        from dsv3.parallel.zero import cpu_adam_available

        why = cpu_adam_available()
        require(why is None, "parallel.offload_optimizer", p.offload_optimizer,
                f"needs DeepSpeed's CPU Adam, which cannot be built here: {why}")


def activation_checkpointing_rules(cfg: Config, world: World) -> None:
    """train.activation_checkpointing names a mode, and the mode composes with the plan."""
    from dsv3.parallel.plan import overlap_enabled_for
    from dsv3.train.recompute import MODES

    t = cfg.train
    one_of("train.activation_checkpointing", t.activation_checkpointing, tuple(MODES))
    # F&B pairs interleave a forward and a backward on two threads that trade turns at the expert
    # all-to-alls; a recomputed MoE layer repeats its all-to-alls inside the backward half, which the
    # pairing does not schedule.
    require(t.activation_checkpointing not in ("full", "moe") or not overlap_enabled_for(cfg.parallel),
            "train.activation_checkpointing", t.activation_checkpointing,
            "full and moe recompute the MoE layers, which cannot run inside the F&B pairs of the expert "
            "all-to-all overlap: set parallel.overlap=false, or use attention")


RULES = (pipeline_rules, expert_parallel_rules, overlap_rules, batch_split_rules, zero_rules,
         activation_checkpointing_rules)
