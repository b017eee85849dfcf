"""The pipeline dimension of a plan: world = pp x dp, rank = pp_rank * dp + dp_rank.

Each rank cuts the model to its stages (`model_stages.cut_model`) and runs them through the
executor (`pipeline_runner`). What several ranks hold (the embedding on the first and last stage,
DualPipe's two copies of every stage) is reduced by global name in `replicas`, with the holders
`StageLayout.holders` gives.
"""
from __future__ import annotations

from dsv3.config.schema import Config
from dsv3.model import Transformer
from dsv3.parallel.layout import Layout
from dsv3.parallel.model_stages import StageLayout, StepContext, cut_model
from dsv3.parallel.overlap import Communicator
from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline_runner import PipelineRunner
from dsv3.parallel.seq1f1b import SegmentKV


def build_pipeline(model: Transformer, cfg: Config, layout: Layout, comm: Communicator
                   ) -> tuple[PipelineRunner, StageLayout]:
    """Cut `model` (built, initialized and expert-sliced whole) to this rank's stages and set up their
    execution; F&B pairs run through `comm` (which overlaps their all-to-alls when enabled)."""
    p, m = cfg.parallel, cfg.model
    stage_layout = StageLayout(p.pp_schedule, p.pp, m.n_layers, m.mtp_depth)
    ctx = StepContext()
    stages = cut_model(model, stage_layout, layout.pp_rank, ctx)
    microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp)
    # Seq1F1B: the schedule's micro-batches are the sequences' segments
    n = p.seq_chunks if p.pp_schedule == "seq1f1b" else 1
    schedule = build_schedule(p.pp_schedule, p.pp, microbatches * n, n)
    act_shape = (cfg.train.micro_batch_size, cfg.data.seq_len // n, m.dim)
    if n > 1:
        for stage in stages:
            stage.carry = SegmentKV([stage.module] + ([stage.loss_fn] if stage.loss_fn is not None else []), ctx, n,
                                    cfg.data.seq_len // n)
    device = next(model.parameters()).device
    runner = PipelineRunner(schedule, stages, ctx, layout.pp_rank, layout.mesh.get_group("pp"), act_shape, device,
                            overlap=comm.run_pair, seq_chunks=n)
    return runner, stage_layout
