"""The plan as the planner sees it: sizes of every dimension, what the step runs per micro-batch, and how
the forward computes (precision on the target device), resolved once from the config and a world size."""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.config.precision import autocast_dtype
from dsv3.config.schema import Config
from dsv3.planner.activations import Chunk, Numerics

# Schedules whose backward is split into I and W: our B/W split keeps a chunk's graph until its W.
SPLIT_SCHEDULES = ("zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class PlanSetup:
    world: int
    pp: int
    dp: int
    ep: int
    schedule: str
    microbatches: int       # micro-batches of train.micro_batch_size sequences per step and dp rank
    seq_chunks: int         # segments per sequence (Seq1F1B), else 1
    zero: int               # ZeRO stage (0: none)
    offload: bool           # optimizer state in host memory
    overlap: bool           # F&B pairs hold two micro-batches at once
    numerics: Numerics
    device: str             # "cuda" or "cpu": where the plan runs

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def units(self) -> int:
        """What the schedule calls micro-batches: one per sequence segment."""
        return self.microbatches * self.seq_chunks

    @property
    def split_backward(self) -> bool:
        return self.pp > 1 and self.schedule in SPLIT_SCHEDULES

    def segment_of(self, unit: int) -> int:
        return unit % self.seq_chunks

    def unit_tokens(self, micro_batch: int, seq: int) -> int:
        return micro_batch * seq // self.seq_chunks

    def chunk(self, stage: int, unit: int, micro_batch: int, seq: int, cfg: Config) -> Chunk:
        """What one forward of `stage` for schedule micro-batch `unit` runs."""
        j, length = self.segment_of(unit), seq // self.seq_chunks
        return Chunk(batch=micro_batch, seq=length, prefix=j * length, last_of_sequence=j == self.seq_chunks - 1,
                     document_masks=cfg.data.document_masks, balance_loss=cfg.train.balance_loss_alpha > 0)


def numerics_for(cfg: Config, device: str) -> Numerics:
    """How the trainer computes on `device` (dsv3/config/precision.py): 16-bit autocast for bf16 and fp16,
    and for fp8 on a GPU (what stays out of FP8 runs in BF16 there; the CPU emulation runs it in fp32); the
    routed experts' kernel as `kernels.grouped_gemm` resolves on that device (dsv3/kernels/ops.py)."""
    dtype, impl = cfg.precision.dtype, cfg.kernels.grouped_gemm
    cuda = device == "cuda"
    if dtype == "fp8":
        experts = "triton" if cuda and impl in ("auto", "triton") else "reference"
    else:
        experts = ("triton" if cuda else "torch") if impl == "auto" else impl
    return Numerics(autocast=autocast_dtype(dtype, device) is not None, fp8=dtype == "fp8", experts=experts,
                    high_precision=tuple(cfg.precision.fp8.high_precision))


def plan_setup(cfg: Config, world_size: int, device: str) -> PlanSetup:
    """`cfg` validated for `world_size` ranks (dsv3.config.validate)."""
    from dsv3.parallel.plan import overlap_enabled

    p, t = cfg.parallel, cfg.train
    dp = world_size // p.pp if p.dp == -1 else p.dp
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    seq1f1b = p.pp > 1 and p.pp_schedule == "seq1f1b"
    overlap = overlap_enabled(cfg) and p.pp == 1 and p.ep > 1   # without a pipeline: accumulation pairs
    return PlanSetup(world=world_size, pp=p.pp, dp=dp, ep=p.ep, schedule=p.pp_schedule, microbatches=microbatches,
                     seq_chunks=p.seq_chunks if seq1f1b else 1, zero=getattr(p, "zero", 0),
                     offload=bool(getattr(p, "offload_optimizer", False)), overlap=overlap,
                     numerics=numerics_for(cfg, device), device=device)
