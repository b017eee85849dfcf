"""The planner's answer for one config on one world: memory per rank and whether it fits, the largest
micro-batch that does, FLOPs per token, bytes on the wire per step, and for the hardware's MFU and link
bandwidths the time per step, tokens per day and GPU-hours per trillion tokens. `make_report` computes
it; `PlanReport.table()` is what a person reads, `PlanReport.to_json()` what a script does."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from dsv3.config.schema import Config, HardwareConfig
from dsv3.parallel.pipeline import Costs, build_schedule, simulate
from dsv3.planner.comm import StepTraffic, step_traffic
from dsv3.planner.flops import Flops, training_flops
from dsv3.planner.memory import GIB, RankMemory, plan_memory
from dsv3.planner.setup import SPLIT_SCHEDULES, PlanSetup, plan_setup
from dsv3.planner.shapes import activated_params, model_shape

SECONDS_PER_DAY = 86400.0


@dataclass
class Timing:
    """At the hardware's peak (BF16) and assumed MFU: model FLOPs / (peak * MFU) per GPU."""

    mfu: float
    step_s: float
    tokens_per_day: float
    gpu_hours_per_trillion_tokens: float
    comm_s: dict[str, float] = field(default_factory=dict)    # each kind's bytes / its link's bandwidth


@dataclass
class PlanReport:
    model: dict
    plan: dict
    hardware: Optional[dict]
    memory: list[RankMemory]
    available_bytes: Optional[float]
    fits: Optional[bool]
    verdict: str
    largest_micro_batch: Optional[int]
    by_recompute: dict[str, int]          # train.activation_checkpointing -> the fullest rank's bytes
    least_recompute_that_fits: Optional[str]
    flops: Flops
    traffic: StepTraffic
    bubble_fraction: Optional[float]
    timing: Optional[Timing]

    @property
    def worst(self) -> RankMemory:
        return max(self.memory, key=lambda r: r.total)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"] = [dict(dataclasses.asdict(r), total=r.total) for r in self.memory]
        out["flops"] = dict(dataclasses.asdict(self.flops), main=self.flops.main, total=self.flops.total)
        out["traffic"] = dict(dataclasses.asdict(self.traffic), total=self.traffic.total)
        return out

    def table(self) -> str:
        return format_table(self)


def implied_mfu(flops_per_token: float, gpu_hours_per_trillion_tokens: float, peak_tflops: float) -> float:
    """The MFU at which `gpu_hours_per_trillion_tokens` GPU-hours train 1e12 tokens."""
    tokens_per_gpu_second = 1e12 / (gpu_hours_per_trillion_tokens * 3600.0)
    return flops_per_token * tokens_per_gpu_second / (peak_tflops * 1e12)


def memory_line(cfg: Config, world_size: int, device: str) -> str:
    """The trainer's startup line: this plan's bytes per rank, from the same code as `launch/plan.py`."""
    setup = plan_setup(cfg, world_size, device)
    worst = max(plan_memory(cfg, setup), key=lambda r: r.total)
    parts = ", ".join(f"{k} {size(v)}" for k, v in worst.components().items() if v)
    host = f"; {size(worst.host)} of optimizer state in host memory" if worst.host else ""
    return f"this plan needs ~{size(worst.total)} per rank ({parts}{host})"


def size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2 ** 20:.1f} MiB"


def make_report(cfg: Config, world_size: int, device: str, search_micro_batch: bool = True) -> PlanReport:
    """`cfg` validated for `world_size` ranks; `device`: "cuda" or "cpu", where it will run."""
    hw = cfg.hardware if cfg.hardware.name else None
    m = cfg.model
    setup = plan_setup(cfg, world_size, device)
    memory = plan_memory(cfg, setup)
    shape = model_shape(m)
    model = {"total_params": shape.main_params(), "activated_params": activated_params(m, shape),
             "mtp_params": shape.mtp_params(), "mtp_activated_params": activated_params(m, shape, mtp=True),
             "n_layers": m.n_layers, "dim": m.dim, "routed_experts": m.n_routed_experts,
             "activated_experts": m.n_activated_experts}
    plan = {"world": world_size, "pp": setup.pp, "dp": setup.dp, "ep": setup.ep, "edp": setup.edp,
            "schedule": setup.schedule if setup.pp > 1 else None, "seq_chunks": setup.seq_chunks,
            "zero": setup.zero, "offload_optimizer": setup.offload, "precision": cfg.precision.dtype,
            "device": device, "micro_batch_size": cfg.train.micro_batch_size, "microbatches": setup.microbatches,
            "global_batch_size": cfg.train.global_batch_size, "seq_len": cfg.data.seq_len,
            "moment_dtype": cfg.optim.moment_dtype, "activation_checkpointing": cfg.train.activation_checkpointing}
    flops = training_flops(m, cfg.data.seq_len)
    ranks_per_node = hw.gpus_per_node if hw else world_size
    traffic = step_traffic(cfg, setup, ranks_per_node)
    available = fits = largest = least = None
    verdict = "no hardware given (+hardware=...): memory only"
    by_recompute = {mode: max(r.total for r in plan_memory(with_recompute(cfg, mode), setup))
                    for mode in allowed_recompute(cfg)}
    if hw is not None:
        available = (hw.memory_gib - hw.reserved_gib) * GIB
        fits, verdict = _verdict(cfg, hw, memory, available, setup)
        least = next((mode for mode in by_recompute if by_recompute[mode] <= available), None)
        if search_micro_batch:
            largest = largest_fitting_micro_batch(cfg, world_size, device, available)
    bubble = None
    if setup.pp > 1:
        # a stage that recomputes runs its W with its I (executor `Stage.recomputes`)
        w = 0.0 if setup.split_backward and cfg.train.activation_checkpointing != "none" else 1.0
        bubble = simulate(build_schedule(setup.schedule, setup.pp, setup.units, setup.seq_chunks),
                          Costs(F=1.0, B=2.0, W=w)).bubble_fraction
    timing = _timing(cfg, hw, flops, traffic, setup) if hw is not None and hw.bf16_tflops > 0 else None
    return PlanReport(model, plan, dataclasses.asdict(hw) if hw else None, memory, available, fits, verdict,
                      largest, by_recompute, least, flops, traffic, bubble, timing)


# train.activation_checkpointing from the least recomputed to the most (docs/memory.md: the fraction of
# the activations each keeps, and the forward it runs again)
RECOMPUTE_ORDER = ("none", "attention", "moe", "full")


def allowed_recompute(cfg: Config) -> list[str]:
    """The modes validation accepts for this plan (the F&B pairs of the expert all-to-all overlap cannot
    recompute MoE layers: dsv3/parallel/config_rules.py)."""
    from dsv3.parallel.plan import overlap_enabled_for

    overlap = overlap_enabled_for(cfg.parallel)
    return [mode for mode in RECOMPUTE_ORDER if not (overlap and mode in ("full", "moe"))]


def with_recompute(cfg: Config, mode: str) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=mode))


def _verdict(cfg: Config, hw: HardwareConfig, memory: list[RankMemory], available: float,
             setup: PlanSetup) -> tuple[Optional[bool], str]:
    world = hw.nodes * hw.gpus_per_node
    if setup.world != world:
        return False, f"the plan has {setup.world} ranks but {hw.name} has {world} GPUs"
    if cfg.precision.dtype == "fp8" and (not hw.compute_capability or
                                         tuple(map(int, hw.compute_capability.split("."))) < (8, 9)):
        return False, f"precision fp8 needs compute capability 8.9+; {hw.gpu or hw.name} has {hw.compute_capability}"
    worst = max(memory, key=lambda r: r.total)
    if worst.host and hw.host_memory_gib and worst.host * hw.gpus_per_node > hw.host_memory_gib * GIB:
        return False, (f"the offloaded optimizer state needs {worst.host * hw.gpus_per_node / GIB:.0f} GiB of host "
                       f"memory per node, {hw.name} has {hw.host_memory_gib:.0f}")
    if worst.total <= available:
        return True, f"fits: {worst.total / GIB:.2f} of {available / GIB:.2f} GiB on the fullest rank"
    comps = sorted(worst.components().items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v / GIB:.1f}" for k, v in comps[:3])
    return False, (f"does not fit: pipeline rank {worst.pp_rank} needs {worst.total / GIB:.2f} GiB, "
                   f"{available / GIB:.2f} are available ({top} GiB)")


def largest_fitting_micro_batch(cfg: Config, world_size: int, device: str, available: float) -> Optional[int]:
    """The largest train.micro_batch_size that fits and splits the global batch evenly (with a valid
    schedule), the other settings unchanged; None if not even 1 does."""
    from dsv3.config import ConfigError
    from dsv3.parallel.pipeline.config import validate_pipeline

    p, t = cfg.parallel, cfg.train
    dp = world_size // p.pp if p.dp == -1 else p.dp
    per_rank = t.global_batch_size // dp
    best = None
    for mbs in range(1, per_rank + 1):
        if per_rank % mbs:
            continue
        if p.pp > 1:
            try:
                validate_pipeline(p.pp, p.pp_schedule, per_rank // mbs, cfg.model.n_layers)
            except ConfigError:
                continue
        trial = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=mbs),
                                    parallel=dataclasses.replace(p, microbatches=-1))
        worst = max(plan_memory(trial, plan_setup(trial, world_size, device)), key=lambda r: r.total)
        if worst.total > available:
            break                                  # activations grow with the micro-batch
        best = mbs
    return best


def _timing(cfg: Config, hw: HardwareConfig, flops: Flops, traffic: StepTraffic, setup: PlanSetup) -> Timing:
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    step = flops.total * tokens / (setup.world * hw.bf16_tflops * 1e12 * hw.mfu)
    per_day = tokens / step * SECONDS_PER_DAY
    gpu_hours = setup.world * step / tokens * 1e12 / 3600.0
    one_node = setup.world <= hw.gpus_per_node
    inter = hw.intra_node_gbs if one_node else hw.inter_node_gbs
    comm = {}
    if traffic.ep_intra and hw.intra_node_gbs:
        comm["ep_all_to_all_intra_node"] = traffic.ep_intra / (hw.intra_node_gbs * 1e9)
    if traffic.ep_inter and hw.inter_node_gbs:
        comm["ep_all_to_all_inter_node"] = traffic.ep_inter / (hw.inter_node_gbs * 1e9)
    if traffic.pp and inter:
        comm["pp_sends"] = traffic.pp / (inter * 1e9)
    if traffic.dp and inter:
        comm["dp_reduction"] = traffic.dp / (inter * 1e9)
    return Timing(hw.mfu, step, per_day, gpu_hours, comm)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_table(r: PlanReport) -> str:
    m, p = r.model, r.plan
    lines = []
    lines.append(f"model: {_count(m['total_params'])} parameters, {_count(m['activated_params'])} activated per "
                 f"token; MTP modules {_count(m['mtp_params'])} ({_count(m['mtp_activated_params'])} activated)")
    sched = f"pp={p['pp']} ({p['schedule']}" + (f", {p['seq_chunks']} segments" if p['seq_chunks'] > 1 else "") \
        + ")" if p["pp"] > 1 else "pp=1"
    zero = f", ZeRO-{p['zero']}" if p["zero"] else ""
    off = " + optimizer offload" if p["offload_optimizer"] else ""
    lines.append(f"plan: {p['world']} ranks = {sched} x dp={p['dp']} (ep={p['ep']}, edp={p['edp']}){zero}{off}; "
                 f"{p['precision']} on {p['device']}, AdamW moments {p['moment_dtype']}; {p['global_batch_size']} "
                 f"sequences of {p['seq_len']} per step, micro-batches of {p['micro_batch_size']} "
                 f"({p['microbatches']} per dp rank)")
    if r.hardware:
        h = r.hardware
        lines.append(f"hardware: {h['name']}: {h['nodes']} x {h['gpus_per_node']} {h['gpu']}, "
                     f"{h['memory_gib']:.0f} GiB each ({h['reserved_gib']:.1f} reserved)")
    lines.append("")
    head = ["pp rank", "stages", "parameters", "gradients", "optimizer", "activations", "buffers", "workspace",
            "total GiB", "in flight"]
    rows = [[str(x.pp_rank), ",".join(map(str, x.stages)), _gib(x.params), _gib(x.grads), _gib(x.optimizer),
             _gib(x.activations), _gib(x.buffers), _gib(x.workspace), _gib(x.total), f"{x.in_flight:.1f}"]
            for x in r.memory]
    if any(x.host for x in r.memory):
        head.append("host GiB")
        for row, x in zip(rows, r.memory):
            row.append(_gib(x.host))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    lines.append("")
    lines.append(f"memory: {r.verdict}")
    if r.largest_micro_batch is not None or r.available_bytes is not None:
        lines.append(f"largest micro-batch that fits (activation checkpointing {p['activation_checkpointing']}): "
                     f"{r.largest_micro_batch if r.largest_micro_batch else 'none'} (now {p['micro_batch_size']})")
    modes = ", ".join(f"{mode} {v / GIB:.2f}" for mode, v in r.by_recompute.items())
    least = ""
    if r.available_bytes is not None:
        least = (f"; the least recomputation that fits: {r.least_recompute_that_fits}" if r.least_recompute_that_fits
                 else "; none of them fits")
    lines.append(f"fullest rank by train.activation_checkpointing (GiB): {modes}{least}")
    f = r.flops
    lines.append(f"FLOPs per token (training, model): {f.total / 1e9:.3g} G = GEMMs {f.gemm / 1e9:.3g} G + attention "
                 f"at {p['seq_len']} tokens {f.attention / 1e9:.3g} G + MTP {f.mtp / 1e9:.3g} G")
    t = r.traffic
    if t.total:
        lines.append(f"per step and rank: EP all-to-all {t.ep_intra / GIB:.2f} GiB in-node + {t.ep_inter / GIB:.2f} "
                     f"GiB across nodes ({t.ep_rows_per_token:.2f} other ranks per token), PP sends "
                     f"{t.pp / GIB:.2f} GiB, DP reduction {t.dp / GIB:.2f} GiB")
    if r.bubble_fraction is not None:
        w = "1:2:0, W with I under recomputation" if (p["schedule"] in SPLIT_SCHEDULES
                                                      and p["activation_checkpointing"] != "none") else "1:2:1"
        lines.append(f"pipeline bubble (simulated, F:B:W = {w}): {r.bubble_fraction:.1%} of the step")
    if r.timing:
        tm = r.timing
        lines.append(f"at MFU {tm.mfu:.0%} of {r.hardware['bf16_tflops']:.0f} TFLOP/s (BF16 peak): {tm.step_s:.2f} s "
                     f"per step, {tm.tokens_per_day / 1e9:.2f}B tokens per day, "
                     f"{tm.gpu_hours_per_trillion_tokens / 1e3:.1f}K GPU-hours per trillion tokens")
        if tm.comm_s:
            lines.append("communication per step at the link bandwidths: " + ", ".join(
                f"{k} {v:.2f} s" for k, v in tm.comm_s.items()) + f" (step {tm.step_s:.2f} s)")
    return "\n".join(lines)
