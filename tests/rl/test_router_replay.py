"""Router replay (rl.router_replay): forcing the MoE routing from outside the model, and recording it in
the cached decoder so that the full forward reproduces the sampler's log-probabilities.

The perturbation that flips routing between the two paths is the aux-loss-free bias (what
rl.expert_bias=update moves between sampling and training): it changes which experts are chosen but
not the gating weights, so with the sampler's experts replayed the full forward is the sampler's
function again."""
import os
import sys

import pytest
import torch

from dsv3.generate import Generator, SamplingParams, routing_layers
from dsv3.model.step_aux import StepAux
from dsv3.rl.rollout import Batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "generate"))
from gen_cases import prompts, tiny_model  # noqa: E402


def forced(model, routing: torch.Tensor) -> StepAux:
    """routing [B, S, layers, K] -> a StepAux that forces it on the model's MoE layers."""
    return StepAux(forced_experts={m: routing[:, :, i] for i, m in enumerate(routing_layers(model))})


def recorded(model, tokens: torch.Tensor) -> torch.Tensor:
    aux = StepAux(record_experts=True)
    model.hidden(tokens, None, aux)
    return torch.stack([aux.experts[m] for m in routing_layers(model)], dim=2)


def shift_biases(model, scale: float = 0.3) -> None:
    """New routing biases: many tokens' top-k changes, the gating weights do not."""
    with torch.no_grad():
        for i, moe in enumerate(model.moe_layers()):
            moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=torch.Generator().manual_seed(100 + i))
                                * scale)


def test_forcing_the_routers_own_choice_changes_nothing():
    """Logits bit-identical to the unforced forward; a negative row keeps the router's choice."""
    model = tiny_model()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens)
        routing = recorded(model, tokens)
        aux = forced(model, routing)
        same = model.head(model.norm(model.hidden(tokens, None, aux)))
        aux2 = forced(model, torch.full_like(routing, -1))
        free = model.head(model.norm(model.hidden(tokens, None, aux2)))
    assert torch.equal(plain, same) and torch.equal(plain, free)
    assert not any(d.any() for d in aux.routing_drift.values())


def test_sampler_and_trainer_agree_under_replay_when_routing_flips():
    """Sample (left-padded prompts of different lengths) with routing recorded, then move the routing
    biases: the full forward over prompt + completion differs from the sampler's log-probabilities
    without replay, and equals them (to fp32 rounding) with the recorded routing replayed; the drift
    counts the flipped tokens."""
    model = tiny_model()
    params = SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=2, seed=3, record_routing=True)
    result = Generator(model).generate(prompts(model.cfg.vocab_size, lengths=(5, 2, 9)), params)
    for c in result.completions:
        assert c.routing.shape == (len(c.prompt_tokens) + len(c.tokens) - 1, 2, 2)
    data = Batch(completions=result.completions).tensors(0, False)
    comp = data["completion"]

    def diff(aux=None) -> float:
        with torch.no_grad():
            logits = model.head(model.norm(model.hidden(data["inputs"], None, aux)))
        logp = torch.log_softmax(logits.float(), -1).gather(-1, data["targets"][..., None])[..., 0]
        return float((logp - data["sampler_logp"]).abs()[comp].max())

    assert diff() < 1e-4                                   # the same model: the paths agree anyway
    routing = data["routing"]
    assert (routing[:, :, 0] >= 0).all(-1).sum() == data["length"].sum()    # every real position recorded
    shift_biases(model)
    aux = forced(model, routing)
    assert diff() > 0.05                                   # the routing flipped: the log-probs moved
    assert diff(aux) < 1e-4                                # replayed: the sampler's log-probs again
    real = torch.arange(routing.shape[1])[None] < data["length"][:, None]
    drift = torch.stack(list(aux.routing_drift.values()), -1).any(-1)
    assert drift[real].float().mean() > 0.2 and not drift[~real].any()


@pytest.mark.parametrize("recompute", ["none", "moe"])
def test_router_gets_the_gradient_under_replay(recompute):
    """Replaying routing R is the model whose router picks R by itself: the same loss and the same
    gradients, the router's included (its weights reach the loss through the gating weights). Also
    when the MoE layers are recomputed in the backward: the recomputation replays R too."""
    from dsv3.train.recompute import apply_activation_checkpointing

    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    replayed, natural = tiny_model(), tiny_model()
    apply_activation_checkpointing(replayed, recompute)
    shift_biases(natural)
    with torch.no_grad():
        routing = recorded(natural, tokens[:, :-1])    # what the shifted router picks
    losses, replay = [], forced(replayed, routing)
    for model, aux in ((replayed, replay), (natural, None)):
        loss = model.losses(tokens[:, :-1], tokens[:, 1:], aux=aux).main
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    assert any(d.any() for d in replay.routing_drift.values())    # its own router would pick others
    for a, b in zip(routing_layers(replayed), routing_layers(natural)):
        assert a.gate.weight.grad.abs().sum() > 0
        assert torch.equal(a.gate.weight.grad, b.gate.weight.grad)
        assert torch.equal(a.experts.w13.grad, b.experts.w13.grad)


def test_recording_refuses_what_it_cannot_record():
    model = tiny_model()
    with pytest.raises(ValueError, match="record_routing"):
        Generator(model).generate([[1, 2]], SamplingParams(record_routing=True, speculative="mtp"))
    dense = tiny_model(n_dense_layers=3)
    with pytest.raises(ValueError, match="n_dense_layers"):
        Generator(dense).generate([[1, 2]], SamplingParams(record_routing=True, max_new_tokens=2))
