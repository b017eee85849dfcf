"""Where a rank sits in the world, and the process groups of each plan dimension, made once.

The world is pp x dp ranks, rank = pp_rank * dp + dp_rank: the pp ranks of one data-parallel replica
form its pipeline, and the dp ranks of one pipeline position hold replicas of the same stage(s). Expert
parallelism lives inside those dp ranks (DeepSeek-V3 trains PP16 x EP64 inside ZeRO-1 data
parallelism): dp = edp x ep, dp_rank = edp_rank * ep + ep_rank, so an EP group is `ep` consecutive
ranks of one stage and an expert-data-parallel (EDP) group holds the replicas of one expert slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch.distributed as dist

from dsv3.config.schema import ParallelConfig
from dsv3.parallel.mesh import Env

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class Layout:
    pp: int
    dp: int
    ep: int
    pp_rank: int = 0
    dp_rank: int = 0
    mesh: Optional["DeviceMesh"] = None   # ("pp", "edp", "ep"); None for a single process

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    def group(self, dim: str) -> Optional[dist.ProcessGroup]:
        """The process group of dimension "pp", "edp" or "ep" through this rank; None when it is just
        this rank (nothing to communicate)."""
        if self.mesh is None or self.mesh.size(self.mesh.mesh_dim_names.index(dim)) == 1:
            return None
        return self.mesh.get_group(dim)

    def expert_mesh(self) -> "DeviceMesh":
        """The (edp, ep) mesh of this rank's pipeline position: expert slices are sharded over "ep" and
        replicated over "edp" (the view DCP checkpoints them in)."""
        return self.mesh["edp", "ep"]

    def dp_ranks(self, experts: bool) -> list[int]:
        """The dp ranks whose copy of a tensor is the same tensor as this rank's: all of them, or for
        an expert slice the ones with this rank's EP position (its EDP group)."""
        return [d for d in range(self.dp) if not experts or d % self.ep == self.ep_rank]

    def global_rank(self, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp + dp_rank


def make_layout(p: ParallelConfig, env: Env) -> Layout:
    """The layout of `cfg.parallel` on this world (validated before: pp and ep divide it)."""
    dp = env.world_size // p.pp
    if env.world_size == 1:
        return Layout(pp=1, dp=1, ep=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (p.pp, dp // p.ep, p.ep), mesh_dim_names=("pp", "edp", "ep"))
    return Layout(pp=p.pp, dp=dp, ep=p.ep, pp_rank=env.rank // dp, dp_rank=env.rank % dp, mesh=mesh)
