"""DeepSeekMoE: shared experts plus fine-grained routed experts with sigmoid gating, group-limited top-k,
aux-loss-free bias balancing and the sequence-wise balance loss (DeepSeek-V3 report, section 2.1.2).

The routed experts always run grouped: (token, k) pairs are sorted by expert by a *token dispatcher*
and all experts are computed by one grouped GEMM per projection. The default dispatcher is local;
an expert-parallel plan swaps in one that exchanges rows between ranks. The model never knows which.
"""
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config.schema import ModelConfig
from dsv3.kernels import ops
from dsv3.model.step_aux import StepAux


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """The router. Selection uses score + bias; the weights use the unbiased scores (official V3 routing)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # b_i of aux-loss-free balancing: adjusted by the trainer after each step, never by gradients.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, forced: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (weights [T, K] fp32, expert indices [T, K], scores [T, E] fp32).

        forced [T, K] (optional): the experts to use instead of this router's choice, per token; a token
        whose row holds a negative index keeps the router's own choice. The weights are always this
        router's scores of the experts used, so the router still learns through them."""
        scores = self.scores(x)
        indices = self.select(scores)
        if forced is not None:
            indices = torch.where((forced >= 0).all(dim=-1, keepdim=True), forced, indices)
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.route_scale
        return weights, indices, scores

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, dim] -> the affinity of every token to every expert [T, E] fp32."""
        with torch.autocast(x.device.type, enabled=False):  # gating stays in fp32 (V3 report, 3.3.1)
            logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The router's own choice [T, K]: top-k of score + bias within the best expert groups."""
        biased = scores.detach() + self.bias
        if self.n_groups > 1:
            grouped = biased.unflatten(-1, (self.n_groups, -1))
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.topk, dim=-1).indices


class Experts(nn.Module):
    """The routed experts as 3-D weights: w13 [E, 2*inter, dim] (gate rows, then up rows), w2 [E, dim, inter]."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, impl: str = "torch"):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.impl = impl
        # Global index of local expert 0; an expert-parallel plan that keeps a slice of the experts sets it,
        # so that initialization (seeded per global expert) does not depend on the plan.
        self.expert_offset = 0

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return ops.expert_swiglu_mlp(x, self.w13, self.w2, offsets, self.impl)


class _PermuteRows(torch.autograd.Function):
    """rows[i] = x[perm[i]] for a permutation: the backward is a gather by the inverse permutation,
    not the accumulating scatter autograd would use for a general index (several times slower on CPU)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class LocalTokenDispatcher:
    """Sorts the (token, k) pairs of one process by expert, and puts the expert outputs back."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor):
        """x [T, dim], indices [T, K] -> (rows [T*K, dim] expert-major, offsets [E] int32, state for combine)."""
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # stable: a deterministic row order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        offsets = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)
        # every token K times, pair-major (its backward sums over K), then sorted by expert
        pairs = x.unsqueeze(1).expand(-1, indices.shape[1], -1).reshape(-1, x.shape[-1])
        return _PermuteRows.apply(pairs, order, inverse), offsets, (order, inverse)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state) -> torch.Tensor:
        """y [T*K, dim] expert-major, weights [T, K] -> out[t] = sum_k weights[t, k] * y[t, k], fp32 sums."""
        order, inverse = state
        per_token = _PermuteRows.apply(y, inverse, order).unflatten(0, weights.shape).float()
        return (per_token * weights.unsqueeze(-1)).sum(dim=1).to(y.dtype)  # not bmm: autocast would make it bf16


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `y` whose backward also feeds d(coeff * aux)/d(aux) = coeff into `aux`'s graph.

    This adds coeff * aux to the training objective without threading the loss through every layer's
    return value, so pipeline stages stay tensor-in, tensor-out."""

    @staticmethod
    def forward(ctx, y, aux, coeff):
        ctx.coeff = coeff
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        shape, dtype, device = ctx.aux_meta
        return grad_y, torch.full(shape, ctx.coeff, dtype=dtype, device=device), None


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, n_activated: int,
                          whole: Optional[Callable] = None) -> torch.Tensor:
    """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences (V3 eq. 17-20).
    `whole(hits, positions, prob_sums)`: these positions are a part of longer sequences (StepAux.parts);
    it returns the sequences' totals, and this part's term is its share of the whole sequences' loss."""
    n_experts = scores.shape[-1]
    probs = (scores / scores.sum(dim=-1, keepdim=True)).unflatten(0, (batch, -1))  # [B, S, E]
    seq_len = probs.shape[1]
    hits = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(1, indices.view(batch, -1), torch.ones_like(indices.view(batch, -1), dtype=scores.dtype))
    if whole is not None:
        prob_sums = probs.sum(dim=1)
        return _PartOfSequenceBalance.apply(prob_sums, whole(hits, seq_len, prob_sums), n_activated)
    f = hits * n_experts / (n_activated * seq_len)
    return (f * probs.mean(dim=1)).sum(dim=-1).mean()


def balance_from_totals(prob_sums: torch.Tensor, hits: torch.Tensor, positions: int, n_activated: int) -> torch.Tensor:
    """sum_i f_i P_i averaged over sequences, from the sums over `positions` of the routing
    probabilities [B, E] and the expert hits [B, E]."""
    f = hits * hits.shape[-1] / (n_activated * positions)
    return (f * prob_sums / positions).sum(dim=-1).mean()


class _PartOfSequenceBalance(torch.autograd.Function):
    """A part's term of its sequences' balance loss: sum_i f_i (sum over its positions of p_i) / S per
    sequence, the parts' terms summing to the whole loss. f and S are the whole sequences': at the
    forward they may still lack the later parts (the value is then partial), at the backward, which
    runs after every part's forward, they are complete; f carries no gradient, so d/dp_i = f_i / S."""

    @staticmethod
    def forward(ctx, prob_sums, totals, n_activated):
        ctx.totals, ctx.n_activated = totals, n_activated
        hits, positions = totals()
        return balance_from_totals(prob_sums, hits, positions, n_activated)

    @staticmethod
    def backward(ctx, grad):
        hits, positions = ctx.totals()
        f = hits * hits.shape[-1] / (ctx.n_activated * positions)
        return grad * f / (positions * hits.shape[0]), None, None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, grouped_gemm: str = "torch"):
        super().__init__()
        self.n_activated = cfg.n_activated_experts
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, grouped_gemm)
        self.shared_experts = (FeedForward(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)
        self.dispatcher = LocalTokenDispatcher(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor, aux: Optional[StepAux] = None) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim]. With `aux`: count the tokens per expert, when
        aux.balance_coeff > 0 add the balance loss to the objective, and route, record and compare as
        its routing fields say (StepAux)."""
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        forced = aux.forced_experts.get(self) if aux is not None and aux.forced_experts else None
        if forced is not None:
            forced = forced.reshape(-1, forced.shape[-1])
        weights, indices, scores = self.gate(flat, forced)
        if aux is not None:
            aux.loads[self] = torch.bincount(indices.flatten(), minlength=scores.shape[-1]).float()
            if aux.record_experts:
                aux.experts[self] = indices.view(B, S, -1)
            if forced is not None:  # where the router, left alone, would have chosen other experts
                own = self.gate.select(scores)
                replayed = (forced >= 0).all(dim=-1)
                differs = (own.sort(dim=-1).values != indices.sort(dim=-1).values).any(dim=-1)
                aux.routing_drift[self] = (differs & replayed).view(B, S)
        rows, offsets, state = self.dispatcher.dispatch(flat, indices)
        y = self.dispatcher.combine(self.experts(rows, offsets), weights, state)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if aux is not None and aux.balance_coeff > 0 and torch.is_grad_enabled():
            whole = None if aux.parts is None else functools.partial(aux.parts.add, self)
            balance = sequence_balance_loss(scores, indices, B, self.n_activated, whole)
            aux.balance.append(balance.detach())
            y = _AttachAuxLoss.apply(y, balance, aux.balance_coeff * aux.grad_scale)
        return y.view(B, S, D)
