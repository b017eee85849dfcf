"""Bytes per rank of a training plan, by component: parameters, gradients, optimizer state, activations
(what the micro-batches in flight keep for backward), communication buffers and the largest transient.

Each pipeline rank is planned on its own (ranks hold different stages and see different numbers of
micro-batches in flight); the data-, expert-parallel and ZeRO ranks of one pipeline position hold the
same amounts (the routed rows an expert rank receives are taken at their mean).
- parameters: fp32 master weights, the model's own (the trainer keeps no other copy); an expert tensor
  is split over the EP group;
- gradients: fp32, one per parameter (accumulated over the micro-batches); ZeRO-2 keeps a 1/dp shard;
- optimizer: AdamW's two moments (optim.moment_dtype) and a step counter per tensor; ZeRO-1/2 shard them
  over the data-parallel ranks (expert tensors over their expert-data-parallel group); offload moves
  them to the host;
- activations: the peak over the step of what the chunks alive keep for backward (`activations.py`),
  walked through the schedule's instruction order (`simulator.peak_activations`), with the backward's
  recomputation under activation checkpointing on top of what is alive when it runs; under Seq1F1B also
  the key/value gradients waiting for their segment's backward;
- buffers: pipeline receives posted ahead of their chunk (fp32 [b, S, dim] each), the flat gradient
  bucket of the data-parallel reduction, the expert all-to-all's send and receive rows of one layer;
- workspace: the largest tensor alive only inside one op (the head's logits and their gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dsv3.config.schema import Config
from dsv3.parallel.data_parallel import BUCKET_NUMEL
from dsv3.parallel.model_stages import StageLayout
from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline.schedule import Op, Schedule
from dsv3.parallel.pipeline.simulator import peak_activations
from dsv3.planner.activations import BF16, FP32, Numerics, chunk_saved, fp8_tiles
from dsv3.planner.shapes import ModelShape, UnitParams, model_shape
from dsv3.planner.setup import PlanSetup

MOMENT_BYTES = {"fp32": FP32, "bf16": BF16}
GIB = 1024 ** 3


@dataclass
class RankMemory:
    """One pipeline rank's bytes (the same on each of its data- and expert-parallel peers)."""

    pp_rank: int
    stages: list[int]
    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    workspace: int
    host: int = 0                                      # offloaded optimizer state, in CPU memory
    chunk_bytes: dict[int, int] = field(default_factory=dict)   # stage -> bytes one micro-batch keeps
    in_flight: float = 0.0                             # activations / the largest chunk: micro-batches alive

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.workspace

    def components(self) -> dict[str, int]:
        return {"parameters": self.params, "gradients": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "buffers": self.buffers, "workspace": self.workspace}


def rank_params(shape: ModelShape, layout: StageLayout, rank: int, ep: int) -> UnitParams:
    """The parameters pipeline rank `rank` holds: its stages' units, each once, experts split over EP."""
    held = UnitParams()
    for unit in layout.modules_of_rank(rank):
        if unit in shape.units:
            held = held + shape.units[unit]
    return UnitParams(held.dense, held.expert // ep, held.tensors)


def outstanding_receives(sched: Schedule, rank: int) -> int:
    """Peak number of receive buffers a rank holds: posted (their batch) and not yet consumed by a chunk."""
    pending, peak = 0, 0
    for ins in sched.ranks[rank]:
        if ins.op in (Op.RECV_ACT, Op.RECV_GRAD):
            pending += 1
            peak = max(peak, pending)
        elif ins.is_compute:
            for part in ins.parts():
                route = sched.route(part.mb)
                if part.op is Op.F and part.stage > 0 and route[part.stage - 1] != rank:
                    pending -= 1
                if part.op in (Op.B, Op.I) and part.stage < sched.n_stages - 1 and route[part.stage + 1] != rank:
                    pending -= 1
    return peak


def pending_kv_grads(m, num: Numerics, setup: PlanSetup, layout: StageLayout, stages: list[int], b: int,
                     seq: int, positions: int | None = None) -> int:
    """Seq1F1B: before a segment's backward, the later segments have left the gradient of the keys and
    values it attended over (its own and the earlier segments', [b, (j+1)L, H, qk] each) in every
    attention module of the stage; at most for the second-to-last segment, (N-1)L positions
    (`positions`: another number)."""
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    per_position = m.n_heads * (qk + max(qk, m.v_head_dim)) * num.act
    attentions = sum(len(layout.ranges[s]) + (m.mtp_depth if s == layout.n_stages - 1 else 0) for s in stages)
    if positions is None:
        positions = seq - seq // setup.seq_chunks
    return attentions * b * positions * per_position


def plan_memory(cfg: Config, setup: PlanSetup) -> list[RankMemory]:
    """Bytes per pipeline rank of `cfg` on the world `setup` describes."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    shape = model_shape(m)
    layout = StageLayout(setup.schedule, setup.pp, m.n_layers, m.mtp_depth)
    num = setup.numerics
    fp8_linears = set(shape.fp8_linears)
    seq, b = cfg.data.seq_len, t.micro_batch_size
    moment = MOMENT_BYTES[cfg.optim.moment_dtype]
    sched = build_schedule(setup.schedule, setup.pp, setup.units, setup.seq_chunks) if setup.pp > 1 else None
    out = []
    for r in range(setup.pp):
        stages = layout.stages_of(r)
        held = rank_params(shape, layout, r, setup.ep)
        dense_b, expert_b = held.dense * FP32, held.expert * FP32
        params = dense_b + expert_b
        # ZeRO shards over the ranks holding the same tensor: dp for dense ones, edp for expert slices
        shard = lambda dense, expert: dense / setup.dp + expert / setup.edp  # noqa: E731
        grads = shard(dense_b, expert_b) if setup.zero >= 2 else params
        opt = 2 * moment * held.total + FP32 * held.tensors
        opt = shard(2 * moment * held.dense, 2 * moment * held.expert) + FP32 * held.tensors if setup.zero >= 1 else opt
        host = 0
        if setup.offload:
            host, opt = opt, 0

        def chunk(stage: int, mb: int = 0) -> tuple[int, int, int]:
            """(bytes one forward keeps, the part still kept between its I and its W, what its backward
            holds beyond that while recomputing)"""
            ch = setup.chunk(stage, mb, b, seq, cfg)
            layers, last = layout.ranges[stage], stage == layout.n_stages - 1
            saved = chunk_saved(m, num, ch, layers, stage == 0, last, fp8_linears, setup.ep, p.expert_align,
                                t.activation_checkpointing)
            top = layers[-1] if layers and layers[-1] >= m.n_dense_layers else None
            # the first stage's input needs no gradient: its I is empty and W runs the whole backward
            early = 0 if stage == 0 else saved.above_weights(f"layers.{top}" if top is not None else None, last)
            if t.activation_checkpointing != "none":   # the executor runs the whole backward at I (Stage.recomputes)
                early = saved.total
            return saved.total, saved.total - early, max(0, saved.backward_peak - saved.total)
        sizes = {s: chunk(s)[0] for s in stages}
        if sched is None:
            one, _, extra = chunk(0)
            act = one * (2 if setup.overlap else 1) + extra   # an F&B pair holds two micro-batches
            recv = 0
        else:
            cache: dict[tuple[int, int], tuple[int, int, int]] = {}

            def of(stage: int, mb: int) -> tuple[int, int, int]:
                key = (stage, setup.segment_of(mb))
                if key not in cache:
                    cache[key] = chunk(stage, mb)
                    j, n, length = setup.segment_of(mb), setup.seq_chunks, seq // setup.seq_chunks
                    if cache[key][2] and n > 1:
                        # while segment j's backward recomputes, its own keys' and values' gradients
                        # ((j+1)L, if a later segment left them) and the earlier segment's, which it
                        # fills (jL), are alive: beyond the (N-1)L counted for every moment below
                        more = max(0, ((j + 1) * length if j < n - 1 else 0) + j * length - (seq - length))
                        cache[key] = (*cache[key][:2], cache[key][2] + pending_kv_grads(
                            m, num, setup, layout, [stage], b, seq, more))
                return cache[key]
            peaks, peaks_w = peak_activations(sched, lambda s, mb: of(s, mb)[0], lambda s, mb: of(s, mb)[1],
                                              lambda s, mb: of(s, mb)[2])
            act = int((peaks_w if setup.split_backward else peaks)[r])
            if setup.seq_chunks > 1:
                act += pending_kv_grads(m, num, setup, layout, stages, b, seq)
            recv = outstanding_receives(sched, r) * setup.unit_tokens(b, seq) * m.dim * FP32
        buffers = recv
        if setup.dp > 1 or setup.pp > 1:   # the reduction's flat fp32 bucket: >= 25M values, closed by a tensor
            largest = max(shape.largest_dense, shape.largest_expert // setup.ep)
            buffers += min(held.total, BUCKET_NUMEL + largest) * FP32
        if setup.ep > 1 and any(i >= m.n_dense_layers for s in stages for i in layout.ranges[s]):
            rows = setup.unit_tokens(b, seq) * m.n_activated_experts
            wire = fp8_tiles(rows, m.dim) if num.fp8 else rows * m.dim * num.act
            buffers += 2 * wire                            # send and receive rows of one exchange
        workspace = 0
        if layout.n_stages - 1 in stages:
            workspace = setup.unit_tokens(b, seq) * m.vocab_size * (num.act + FP32)
        out.append(RankMemory(r, stages, int(params), int(grads), int(opt), int(act), int(buffers), int(workspace),
                              int(host), sizes, act / max(sizes.values())))
    return out
