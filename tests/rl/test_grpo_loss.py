"""The GRPO objective (dsv3/rl/grpo_loss.py) against `trl`'s GRPOTrainer and against closed forms.

TRL's loss is a method of its trainer (`GRPOTrainer._compute_loss`); it is run here as it is, on a
stand-in that holds the settings it reads and returns the policy's log-probabilities for the rows it is
given. Each TRL loss type is run the way TRL trains: the batch split into micro-batches of gradient
accumulation, one call per micro-batch, the losses summed. Our side weights the whole batch at once.
Both must give the same loss and the same gradient with respect to the policy's logits.
"""
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dsv3.rl.grpo_loss import (clipped_objective, group_advantages, kl_estimate, token_logprobs, token_weights,
                               zero_std_groups)

G, GROUPS, L, V = 4, 3, 9, 13
N = G * GROUPS
T = 0.7  # sampling temperature: both sides score log softmax(logits / T)


def reference_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """TRL's group normalization (`scale_rewards="group"` / `"none"`), written out: the group mean, and
    the unbiased group std plus 1e-4."""
    out = torch.empty_like(rewards)
    for g in range(0, len(rewards), G):
        r = rewards[g:g + G].double()
        mean = r.sum() / G
        std = (((r - mean) ** 2).sum() / (G - 1)).sqrt()
        out[g:g + G] = ((r - mean) / (std + 1e-4) if scale else r - mean).float()
    return out


def batch(seed: int):
    """A policy (logits, a leaf), the sampled tokens, completion masks of varied lengths (one empty),
    the old policy and the reference as perturbations of the policy, and rewards with ties."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, L, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (N, L), generator=gen)
    lengths = torch.randint(1, L + 1, (N,), generator=gen)
    lengths[5] = 0
    mask = torch.arange(L)[None, :] < lengths[:, None]
    with torch.no_grad():
        old = torch.log_softmax((logits + 0.4 * torch.randn(N, L, V, generator=gen, dtype=torch.float64)) / T, -1)
        ref = torch.log_softmax((logits + 0.3 * torch.randn(N, L, V, generator=gen, dtype=torch.float64)) / T, -1)
    old_logp = old.gather(-1, targets[..., None]).squeeze(-1)
    ref_logp = ref.gather(-1, targets[..., None]).squeeze(-1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,  0.1, 1.1, 1.1, 1.1,  0.5, 0.5, 0.5, 0.5])  # last group: no signal
    return logits.requires_grad_(True), targets, mask, old_logp, ref_logp, rewards


class TRLStandIn:
    """What `GRPOTrainer._compute_loss` reads of its trainer (trl 1.x), one training process, token-level
    importance sampling, no entropy mask, bonus or vLLM correction. The row of each sequence travels as
    its one prompt token, so `_get_per_token_logps_and_entropies` knows which policy rows to score."""

    def __init__(self, logits, loss_type, beta, epsilon, epsilon_high, max_completion_length, accumulation):
        self.logits, self.loss_type, self.beta = logits, loss_type, beta
        self.epsilon_low, self.epsilon_high = epsilon, epsilon_high
        self.max_completion_length = max_completion_length
        self.current_gradient_accumulation_steps = accumulation
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation)
        self.aux_loss_enabled, self.top_entropy_quantile, self.off_policy_mask_threshold = False, 1.0, None
        self.importance_sampling_level = "token"
        self.use_vllm, self.vllm_importance_sampling_correction, self._entropy_bonus_enabled = False, False, False
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                           reduce=lambda x, reduction: x, sync_gradients=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **_):
        rows = input_ids[:, 0]
        logp_all = torch.log_softmax(self.logits[rows] / T, dim=-1)
        targets = input_ids[:, -logits_to_keep:]
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        return logp, -(logp_all.exp() * logp_all).sum(-1).detach(), None


def trl_loss(logits, targets, mask, old_logp, ref_logp, advantages, loss_type, beta, eps, eps_high, constant,
             micro_batches):
    """Sum of TRL's per-micro-batch losses over the gradient-accumulation window."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    size = N // micro_batches
    trainer = TRLStandIn(logits, loss_type, beta, eps, eps_high, constant, micro_batches)
    total = 0
    for start in range(0, N, size):
        rows = torch.arange(start, start + size)
        inputs = {"prompt_ids": rows[:, None], "prompt_mask": torch.ones(size, 1, dtype=torch.long),
                  "completion_ids": targets[rows], "completion_mask": mask[rows].long(),
                  "advantages": advantages[rows].double(), "old_per_token_logps": old_logp[rows],
                  "ref_per_token_logps": ref_logp[rows], "num_items_in_batch": mask.sum().double()}
        total = total + trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return total, trainer._metrics["train"]


def our_loss(logits, targets, mask, old_logp, ref_logp, advantages, aggregation, beta, eps, eps_high, constant):
    logp, _ = token_logprobs(logits, targets, T)
    terms = clipped_objective(logp, old_logp, advantages, eps, eps_high, ref_logp, beta, "k3")
    return (terms.loss * token_weights(mask, aggregation, constant, torch.float64)).sum(), terms


# (our aggregation, TRL's loss type, micro-batches TRL accumulates over)
MATCHES = [("sequence_mean", "grpo", 3), ("token_mean", "dapo", 3), ("constant", "dr_grpo", 3),
           ("token_mean", "bnpo", 1)]  # bnpo is a token mean per micro-batch: the batch's only with one


@pytest.mark.parametrize("aggregation,loss_type,micro_batches", MATCHES)
@pytest.mark.parametrize("beta,eps,eps_high,scale", [(0.0, 0.2, 0.2, True), (0.04, 0.2, 0.28, True),
                                                     (0.04, 0.1, 0.3, False)])
def test_loss_and_gradient_equal_trl(aggregation, loss_type, micro_batches, beta, eps, eps_high, scale):
    logits, targets, mask, old_logp, ref_logp, rewards = batch(zlib.crc32(f"{aggregation}/{beta}/{eps}".encode()))
    advantages = group_advantages(rewards, G, scale).double()
    assert torch.allclose(advantages, reference_advantages(rewards, scale).double(), atol=1e-6)
    constant = 11  # Dr. GRPO's per-completion constant, TRL's max_completion_length
    ours, terms = our_loss(logits, targets, mask, old_logp, ref_logp, advantages, aggregation, beta, eps, eps_high,
                           constant)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs, metrics = trl_loss(logits, targets, mask, old_logp, ref_logp, advantages, loss_type, beta, eps,
                               eps_high, constant, micro_batches)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-14)
    assert grad_ours.abs().sum() > 0                       # not vacuous: the batch has a signal
    # the clip fractions we log are TRL's (one micro-batch: its token means are the batch's; TRL's are fp32)
    if micro_batches == 1:
        m = mask.double()
        assert (terms.clipped_low * m).sum().item() / m.sum().item() == pytest.approx(
            metrics["clip_ratio/low_mean"][0], rel=1e-6)
        assert (terms.clipped_high * m).sum().item() / m.sum().item() == pytest.approx(
            metrics["clip_ratio/high_mean"][0], rel=1e-6)
        assert 0 < metrics["clip_ratio/low_mean"][0] + metrics["clip_ratio/high_mean"][0] < 1  # clipping happened


def test_first_inner_step_has_ratio_one_and_the_plain_policy_gradient():
    """pi_old = pi on the first of mu steps: the ratio is exactly 1, nothing is clipped, and the gradient
    is that of -A log pi (the REINFORCE form with the group baseline)."""
    logits, targets, mask, _, _, rewards = batch(seed=3)
    advantages = group_advantages(rewards, G, True).double()
    logp, _ = token_logprobs(logits, targets, T)
    terms = clipped_objective(logp, logp.detach(), advantages, 0.2, 0.28)
    assert torch.equal(terms.ratio, torch.ones_like(terms.ratio))
    assert not terms.clipped_low.any() and not terms.clipped_high.any()
    w = token_weights(mask, "sequence_mean", dtype=torch.float64)
    (g,) = torch.autograd.grad((terms.loss * w).sum(), logits, retain_graph=True)
    (g_pg,) = torch.autograd.grad((-advantages[:, None] * logp * w).sum(), logits)
    torch.testing.assert_close(g, g_pg, rtol=1e-12, atol=1e-15)


def test_k3_is_exactly_zero_when_policy_equals_reference():
    logits, targets, _, _, _, _ = batch(seed=4)
    logp, _ = token_logprobs(logits.detach().float(), targets, T)
    assert torch.equal(kl_estimate(logp, logp.clone(), "k3"), torch.zeros_like(logp))


@pytest.mark.parametrize("estimator,unbiased", [("k1", True), ("k2", False), ("k3", True)])
def test_kl_estimators_in_expectation(estimator, unbiased):
    """E_{x~pi}[k(x)] over the whole vocabulary, enumerated: k1 and k3 are unbiased estimators of
    KL(pi || pi_ref); k2 is not, and is >= 0 like k3 (k1 is not)."""
    gen = torch.Generator().manual_seed(5)
    logp = torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64), 0)
    ref = torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64), 0)
    exact = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logp),
                                              torch.distributions.Categorical(logits=ref))
    k = kl_estimate(logp, ref, estimator)
    expectation = (logp.exp() * k).sum()
    if unbiased:
        assert expectation.item() == pytest.approx(exact.item(), rel=1e-12)
    else:
        assert abs(expectation.item() - exact.item()) > 1e-3
    if estimator != "k1":
        assert (k >= 0).all()
    else:
        assert (k < 0).any()


def test_aggregations_weigh_tokens_as_their_papers_say():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    seq = token_weights(mask, "sequence_mean")
    assert torch.allclose(seq[0], torch.full((4,), 1 / 12)) and seq[1, 0] == pytest.approx(1 / 3)
    tok = token_weights(mask, "token_mean")
    assert torch.allclose(tok[mask], torch.full((5,), 1 / 5))
    const = token_weights(mask, "constant", 8)
    assert torch.allclose(const[mask], torch.full((5,), 1 / 24))
    for w in (seq, tok, const):
        assert (w[~mask] == 0).all()


def test_zero_std_groups_and_their_advantages():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert zero_std_groups(rewards, 4).tolist() == [True, False]
    adv = group_advantages(rewards, 4, True)
    assert (adv[:4] == 0).all() and adv[5] > 0 and (adv[[4, 6, 7]] < 0).all()
