"""Bytes each rank sends per optimizer step, by kind, as this code moves them:

- EP all-to-all, per MoE layer and micro-batch: dispatch sends each token once to every other rank
  holding one of its experts (FP8 rows with 1x128 scales under the FP8 recipe, else the router input's
  fp32), combine returns one row per (token, expert) pair (BF16 with FP8, else the experts' dtype);
  backward sends the same rows back in BF16 with FP8 (else the same dtypes). How many ranks a token
  reaches follows from group-limited routing with experts picked evenly inside the chosen groups. Split
  into rows to ranks on the same node (NVLink) and to other nodes (network);
- PP: the fp32 residual stream [b, S, dim] of every SEND of the rank's schedule, forward and backward;
- DP: the gradient reduction of a ring all-reduce, 2(N-1)/N of the fp32 gradients per group of N
  copies (ZeRO's reduce-scatter plus all-gather move the same); dense tensors over the dp ranks (and
  their pipeline copies), expert slices over their expert-data-parallel group.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

from dsv3.config.schema import Config
from dsv3.parallel.model_stages import StageLayout
from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline.schedule import Op
from dsv3.planner.activations import BF16, FP32, fp8_tiles
from dsv3.planner.memory import rank_params
from dsv3.planner.setup import PlanSetup
from dsv3.planner.shapes import model_shape


@dataclass(frozen=True)
class StepTraffic:
    """Bytes one rank sends per step (the busiest pipeline rank for each kind)."""

    ep_intra: float      # expert all-to-all, to ranks of the same node
    ep_inter: float      # expert all-to-all, to other nodes
    pp: float            # pipeline activations and their gradients
    dp: float            # gradient reduction
    ep_rows_per_token: float   # mean ranks other than its own a token is dispatched to

    @property
    def total(self) -> float:
        return self.ep_intra + self.ep_inter + self.pp + self.dp


def _p_hit(experts_in_bin: int, cfg_groups: tuple[int, int, int, int]) -> float:
    """Probability that a token uses at least one of the `experts_in_bin` contiguous experts of a bin
    (a rank or a node), under group-limited routing with experts spread evenly in the chosen groups."""
    E, G, topk_groups, K = cfg_groups
    per_group = E // G
    if experts_in_bin >= per_group:                     # the bin holds whole groups
        g = experts_in_bin // per_group
        return 1 - comb(G - g, topk_groups) / comb(G, topk_groups)
    n = topk_groups * per_group                         # the bin lies inside one group
    chosen = topk_groups / G
    return chosen * (1 - comb(n - experts_in_bin, K) / comb(n, K))


def ep_destinations(cfg: Config, ep: int, ranks_per_node: int) -> tuple[float, float]:
    """Expected (other ranks on this node, ranks on other nodes) a token is dispatched to."""
    m = cfg.model
    groups = (m.n_routed_experts, m.n_expert_groups, m.n_limited_groups, m.n_activated_experts)
    per_rank = m.n_routed_experts // ep
    p_rank = _p_hit(per_rank, groups)
    node = min(ranks_per_node, ep)                      # EP ranks of this token's node in the group
    same_node = (node - 1) * p_rank
    other = (ep - node) * p_rank
    return same_node, other


def step_traffic(cfg: Config, setup: PlanSetup, ranks_per_node: int) -> StepTraffic:
    m, t = cfg.model, cfg.train
    shape = model_shape(m)
    layout = StageLayout(setup.schedule, setup.pp, m.n_layers, m.mtp_depth)
    tokens = setup.unit_tokens(t.micro_batch_size, cfg.data.seq_len)
    num = setup.numerics
    sched = build_schedule(setup.schedule, setup.pp, setup.units, setup.seq_chunks) if setup.pp > 1 else None
    ep_intra = ep_inter = pp = dp = 0.0
    same, other = ep_destinations(cfg, setup.ep, ranks_per_node) if setup.ep > 1 else (0.0, 0.0)
    if setup.ep > 1:
        node = min(ranks_per_node, setup.ep)
        dispatch = fp8_tiles(1, m.dim) if num.fp8 else m.dim * FP32
        combine = m.dim * (BF16 if num.fp8 or num.autocast else FP32)
        back = m.dim * BF16 if num.fp8 else None                # gradients return in BF16 with FP8
        # each rank gets K/ep of a token's (token, expert) pairs on average; dispatch sends a token once
        # per destination rank, combine one row per pair; backward sends both again the other way
        pairs_same, pairs_other = (m.n_activated_experts * n / setup.ep for n in (node - 1, setup.ep - node))

        def per_token(rows: float, pairs: float) -> float:
            return rows * (dispatch + (back or dispatch)) + pairs * (combine + (back or combine))
    moe_layers = [sum(1 for i in layout.ranges[s] if i >= m.n_dense_layers)
                  + (m.mtp_depth if s == layout.n_stages - 1 else 0) for s in range(layout.n_stages)]
    for r in range(setup.pp):
        if sched is None:
            forwards = setup.units * moe_layers[0]      # layer forwards of MoE layers per step
        else:
            forwards = sum(moe_layers[part.stage] for ins in sched.compute(r) for part in ins.parts()
                           if part.op is Op.F)
        if setup.ep > 1:
            rows = forwards * tokens
            ep_intra = max(ep_intra, rows * per_token(same, pairs_same))
            ep_inter = max(ep_inter, rows * per_token(other, pairs_other))
        if sched is not None:
            sends = sum(1 for ins in sched.ranks[r] if ins.op in (Op.SEND_ACT, Op.SEND_GRAD))
            pp = max(pp, sends * tokens * m.dim * FP32)
        held = rank_params(shape, layout, r, setup.ep)
        holders = 1 + (1 if setup.schedule == "dualpipe" else 0)   # DualPipe's two copies of each stage
        n_dense, n_expert = setup.dp * holders, setup.edp * holders
        ring = lambda n: 2 * (n - 1) / n if n > 1 else 0.0   # noqa: E731
        dp = max(dp, FP32 * (held.dense * ring(n_dense) + held.expert * ring(n_expert)))
    return StepTraffic(ep_intra, ep_inter, pp, dp, same + other)
