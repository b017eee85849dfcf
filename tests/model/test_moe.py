"""DeepSeekMoE pieces against their definitions, written the slow, obvious way."""
import dataclasses

import torch
import torch.nn.functional as F

from dsv3.config.schema import ModelConfig
from dsv3.model.init import init_weights
from dsv3.model.moe import MoE, sequence_balance_loss
from dsv3.model.step_aux import StepAux

CFG = ModelConfig(dim=32, moe_inter_dim=16, n_routed_experts=12, n_activated_experts=3, n_expert_groups=4,
                  n_limited_groups=2, route_scale=2.5, n_shared_experts=1)


def make_moe(cfg=CFG, seed=0):
    moe = MoE(cfg)
    init_weights(moe, seed=seed, std=0.1)
    with torch.no_grad():
        moe.gate.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return moe


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert, a plain SwiGLU: the definition the grouped path must equal."""
    flat = x.reshape(-1, x.shape[-1])
    w, idx, _ = moe.gate(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            gate, up = (moe.experts.w13[e] @ flat[t]).chunk(2)
            out[t] += w[t, k] * (moe.experts.w2[e] @ (F.silu(gate) * up))
    return (out + moe.shared_experts(flat)).view_as(x)


def test_grouped_experts_equal_the_per_token_definition():
    moe = make_moe()
    x = torch.randn(2, 7, CFG.dim)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), rtol=1e-5, atol=1e-6)


def test_grouped_experts_gradients_equal_the_definition():
    moe = make_moe()
    x = torch.randn(2, 5, CFG.dim, requires_grad=True)
    g = torch.randn(2, 5, CFG.dim)
    grads_fast = torch.autograd.grad((moe(x) * g).sum(), [x, moe.experts.w13, moe.experts.w2, moe.gate.weight])
    grads_slow = torch.autograd.grad((naive_moe(moe, x) * g).sum(), [x, moe.experts.w13, moe.experts.w2, moe.gate.weight])
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_expert_taking_every_token_and_empty_experts():
    moe = make_moe()
    with torch.no_grad():  # a huge bias on expert 5 and its group: every token picks it, most experts get none
        moe.gate.bias.zero_()
        moe.gate.bias[5] = 100.0
    x = torch.randn(1, 9, CFG.dim)
    _, idx, _ = moe.gate(x.view(-1, CFG.dim))
    assert (idx == 5).any(dim=1).all()
    torch.testing.assert_close(moe(x), naive_moe(moe, x), rtol=1e-5, atol=1e-6)


def test_group_limited_routing_only_uses_the_best_groups():
    moe = make_moe()
    x = torch.randn(64, CFG.dim)
    _, idx, scores = moe.gate(x)
    biased = scores + moe.gate.bias
    per_group = CFG.n_routed_experts // CFG.n_expert_groups
    group_score = biased.view(64, CFG.n_expert_groups, per_group).topk(2, dim=-1).values.sum(-1)
    allowed = group_score.topk(CFG.n_limited_groups, dim=-1).indices
    assert all(set((idx[t] // per_group).tolist()) <= set(allowed[t].tolist()) for t in range(64))


def test_weights_come_from_unbiased_scores_normalized_and_scaled():
    moe = make_moe()
    x = torch.randn(16, CFG.dim)
    w, idx, scores = moe.gate(x)
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * CFG.route_scale
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(scores, torch.sigmoid(x @ moe.gate.weight.t()))


def test_sequence_balance_loss_matches_the_report_formula():
    B, S, E, K = 3, 5, 6, 2
    scores = torch.rand(B * S, E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    loss = sequence_balance_loss(scores, idx, B, K)
    expected = 0.0
    for b in range(B):
        s = scores[b * S:(b + 1) * S]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.tensor([(idx[b * S:(b + 1) * S] == i).any(-1).sum().item() for i in range(E)]) * E / (K * S)
        expected += (f * p).sum() / B
    torch.testing.assert_close(loss, expected)


def test_balance_loss_gradient_is_alpha_times_its_gradient():
    """The injected gradient equals that of adding coeff * L_bal to the objective."""
    moe = make_moe()
    x = torch.randn(2, 6, CFG.dim)
    coeff = 0.37
    moe.train()
    aux = StepAux(balance_coeff=coeff)
    injected = torch.autograd.grad(moe(x, aux).sum(), moe.gate.weight)[0]
    flat = x.view(-1, CFG.dim)
    _, idx, scores = moe.gate(flat)
    explicit = torch.autograd.grad(moe(x).sum() + coeff * sequence_balance_loss(scores, idx, 2, CFG.n_activated_experts),
                                   moe.gate.weight)[0]
    torch.testing.assert_close(injected, explicit)
    assert not torch.allclose(injected, torch.autograd.grad(moe(x).sum(), moe.gate.weight)[0])
    torch.testing.assert_close(aux.balance[0], sequence_balance_loss(scores, idx, 2, CFG.n_activated_experts))


def test_expert_counts_go_to_the_aux_the_caller_hands_in_and_nowhere_else():
    moe = make_moe()
    x = torch.randn(2, 4, CFG.dim)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    moe(x)  # no aux: nothing recorded, nothing kept on the module
    aux = StepAux()
    moe(x, aux)
    _, idx, _ = moe.gate(x.view(-1, CFG.dim))
    assert list(aux.loads) == [moe] and aux.balance == []  # coefficient 0: no balance loss
    assert torch.equal(aux.loads[moe], torch.bincount(idx.flatten(), minlength=CFG.n_routed_experts).float())
    assert aux.loads[moe].sum() == 2 * 4 * CFG.n_activated_experts
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())


def test_softmax_routing_is_not_renormalized():
    cfg = dataclasses.replace(CFG, score_func="softmax", n_expert_groups=1, n_limited_groups=1, route_scale=1.0)
    moe = make_moe(cfg)
    w, idx, scores = moe.gate(torch.randn(8, cfg.dim))
    torch.testing.assert_close(scores.sum(-1), torch.ones(8))
    torch.testing.assert_close(w, scores.gather(1, idx))
