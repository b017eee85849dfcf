"""The GRPO objective, as functions of tensors (DeepSeekMath §4.1; R1 report §2.2.1; DAPO; Dr. GRPO).

For a group of G completions o_1..o_G of one prompt with rewards r_i, the advantage of every token of
o_i is A_i = (r_i - mean(r)) / (std(r) + 1e-4) (std: the unbiased estimate, as TRL and verl take it),
or A_i = r_i - mean(r) without the std scaling (Dr. GRPO). Per token t of o_i, with the ratio
rho = pi(o_it) / pi_old(o_it):

    l_it = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) + beta KL_it

and the loss is sum_it w_it l_it, the weights w saying how tokens are aggregated:
- `sequence_mean` (GRPO): w_it = 1 / (N |o_i|): a completion's token mean, then the mean over the N
  completions of the batch. Long completions weigh less per token.
- `token_mean` (DAPO): w_it = 1 / sum_i |o_i|: every token of the batch alike.
- `constant` (Dr. GRPO): w_it = 1 / (N C): a constant per completion (C = the generation budget),
  so neither length nor batch composition rescales a token's gradient.
The weights are computed on the whole batch before it is split over ranks and micro-batches, which is
what makes a step's gradient the same whatever the plan.

KL estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence"), with
d = log pi_ref(o_it) - log pi(o_it): k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1. k3 is unbiased,
always >= 0, and exactly 0 where pi = pi_ref.
"""
from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4  # added to the group std (TRL's value): a group of near-equal rewards stays finite


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """rewards [N] (N = groups x G, group-major) -> advantages [N]."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return adv.flatten()


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] bool: every reward of the group is the same (no learning signal)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probabilities."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"KL estimator {estimator!r}: must be one of k1, k2, k3")


def token_weights(mask: torch.Tensor, aggregation: str, constant: float | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mask [N, L] (completion tokens that count) -> weights [N, L] with the loss = sum w * l (module doc)."""
    m = mask.to(dtype)
    n = m.shape[0]
    if aggregation == "sequence_mean":
        return m / (m.sum(dim=1, keepdim=True).clamp(min=1) * n)
    if aggregation == "token_mean":
        return m / m.sum().clamp(min=1)
    if aggregation == "constant":
        if not constant:
            raise ValueError("constant aggregation needs the constant normalizer")
        return m / (n * constant)
    raise ValueError(f"loss aggregation {aggregation!r}: must be one of sequence_mean, token_mean, constant")


@dataclass
class TokenTerms:
    """Per-token pieces of the objective, [n, L] each."""

    loss: torch.Tensor
    """l_it (with grad)."""
    ratio: torch.Tensor
    kl: torch.Tensor | None
    clipped_low: torch.Tensor
    """The ratio is below 1 - eps where the advantage is negative: the clip stops the gradient."""
    clipped_high: torch.Tensor
    """The ratio is above 1 + eps_high where the advantage is positive."""


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                      epsilon_high: float, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                      estimator: str = "k3") -> TokenTerms:
    """logp (with grad), old_logp, ref_logp [n, L]; advantages [n]."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(logp.dtype)
    loss = -torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon_high) * a)
    kl = None
    if beta != 0:
        kl = kl_estimate(logp, ref_logp, estimator)
        loss = loss + beta * kl
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (a < 0)
        high = (ratio > 1 + epsilon_high) & (a > 0)
    return TokenTerms(loss, ratio.detach(), None if kl is None else kl.detach(), low, high)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T) at the targets, and the entropy of that distribution; [n, L] each, in fp32
    at least (bf16 logits are upcast: ratios of probabilities need the precision). The entropy is
    computed without a gradient (a metric)."""
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy
