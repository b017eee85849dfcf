"""Stages cut from the model (in one process): which rank holds what, and the stages run in order
are the model: the same losses, and gradients whose sum over a replicated tensor's copies is the
model's gradient (the rule dsv3.parallel.replicas applies across ranks)."""
import copy

import pytest
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.model.step_aux import StepAux
from dsv3.parallel.model_stages import StageLayout, StepContext, cut_model
from dsv3.parallel.pipeline import build_schedule

CFG = ModelConfig(n_layers=4, n_dense_layers=1, mtp_depth=1)
LAMBDA = 0.3


@pytest.mark.parametrize("schedule,pp,mtp_depth,expected", [
    # 1f1b: layers 0-2 | 3 (the last stage also runs MTP, worth a layer); the embedding on both ends
    ("1f1b", 2, 1, {"embed.weight": (0, 1), "layers.2.attn_norm.weight": (0,), "layers.3.ffn.gate.weight": (1,),
                    "head.weight": (1,), "mtp.0.eh_proj.weight": (1,), "norm.weight": (1,)}),
    ("1f1b", 2, 0, {"embed.weight": (0,), "head.weight": (1,)}),  # no MTP: the last stage needs no embedding
    ("dualpipe", 4, 1, {"embed.weight": (0, 3), "layers.0.attn.wkv_a.weight": (0, 3),
                        "layers.1.attn.wkv_a.weight": (1, 2), "mtp.0.block.ffn.gate.weight": (0, 3)}),
    ("dualpipev", 2, 1, {"embed.weight": (0,), "head.weight": (0,), "layers.0.ffn.w1.weight": (0,),
                         "layers.1.ffn.gate.weight": (1,), "layers.2.ffn.gate.weight": (1,),
                         "layers.3.ffn.gate.weight": (0,)}),
])
def test_layout_says_which_pipeline_ranks_hold_a_tensor(schedule, pp, mtp_depth, expected):
    layout = StageLayout(schedule, pp, CFG.n_layers, mtp_depth)
    assert [list(r) for r in layout.ranges] == [[i] for i in range(4)] if layout.n_stages == 4 else True
    for name, ranks in expected.items():
        assert layout.holders(name) == ranks, name


def _model(mtp_depth: int = 1) -> Transformer:
    cfg = copy.deepcopy(CFG)
    cfg.mtp_depth = mtp_depth
    model = Transformer(cfg)
    init_weights(model, seed=1, std=0.02)
    return model


COEFF = 1e-2  # the balance loss's coefficient: the side-channel loss is part of the gradients compared below


@pytest.mark.parametrize("schedule,pp", [("1f1b", 2), ("zb1p", 4), ("dualpipe", 2), ("dualpipev", 2)])
def test_stages_run_in_order_are_the_model(schedule, pp):
    torch.manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    labels = torch.randint(0, CFG.vocab_size, (2, 16))
    whole = _model()
    aux = StepAux(COEFF)
    parts = whole.losses(tokens, labels, aux=aux)
    ((parts.main + LAMBDA * torch.stack(parts.mtp).mean())).backward()

    layout = StageLayout(schedule, pp, CFG.n_layers, CFG.mtp_depth)
    sched = build_schedule(schedule, pp, 2 * pp)
    ranks, stages = [], {}
    for r in range(pp):
        model, ctx = _model(), StepContext(mtp_weight=LAMBDA, aux=StepAux(COEFF))
        for s in cut_model(model, layout, r, ctx):
            if sched.rank_of(s.index, 0) == r:   # micro-batch 0's route
                stages[s.index] = s
        ranks.append((model, ctx))
        names = {n for n, _ in model.named_parameters()}
        assert names == {n for n, _ in whole.named_parameters() if r in layout.holders(n)}

    h = tokens
    for s in range(layout.n_stages):
        h = stages[s].module(h)
    loss = stages[layout.n_stages - 1].loss_fn(h, (tokens, labels))
    loss.backward()
    ctx = ranks[sched.rank_of(layout.n_stages - 1, 0)][1]
    assert torch.equal(ctx.main[0], parts.main.detach()) and torch.equal(ctx.mtp[0], parts.mtp[0].detach())
    # every MoE layer's balance loss and expert counts recorded once, by the stage (or the MTP head) that ran it
    recorded = sum(sum(c.balance) for _, c in ranks)
    torch.testing.assert_close(recorded, sum(aux.balance), rtol=1e-6, atol=0)
    counts = {name: c.loads[moe] for m, c in ranks for name, moe in m.named_modules() if moe in c.loads}
    assert counts.keys() == {n for n, moe in whole.named_modules() if moe in aux.loads}
    for name, moe in whole.named_modules():
        if moe in aux.loads:
            assert torch.equal(counts[name], aux.loads[moe]), name

    for name, p in whole.named_parameters():
        copies = [dict(m.named_parameters()).get(name) for m, _ in ranks]
        got = sum(c.grad for c in copies if c is not None and c.grad is not None)
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-9, msg=name)
