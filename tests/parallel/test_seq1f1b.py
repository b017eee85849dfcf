"""Seq1F1B (arXiv 2406.03488): the schedule over sequence segments, and a stage running its segments
(keys and values of the earlier segments, gradients back into them in reverse order) computes the
unsegmented model: losses and gradients equal (fp32, 1e-5), MTP at depths 1 and 2 included.

In one process: the executor on one pipeline rank (no messages) runs the Seq1F1B schedule's order of
segments exactly as each rank does; the two-rank run through the real entry point is in
tests/parallel/test_seq1f1b_training.py."""
import copy

import pytest
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.model.step_aux import SequenceParts, StepAux
from dsv3.model.transformer import IGNORE
from dsv3.parallel.model_stages import StageLayout, StepContext, cut_model
from dsv3.parallel.pipeline import PipelineExecutor, build_schedule, check_blocking_comms, simulate, Costs
from dsv3.parallel.pipeline.simulator import peak_activations
from dsv3.parallel.seq1f1b import SegmentKV
from dsv3.train.recompute import apply_activation_checkpointing

LAMBDA = 0.3


@pytest.mark.parametrize("pp,sequences,n", [(2, 2, 4), (4, 3, 2), (3, 1, 8)])
def test_schedule_runs_each_sequence_backward_in_reverse_and_holds_fewer_sequences(pp, sequences, n):
    sched = build_schedule("seq1f1b", pp, sequences * n, n)
    check_blocking_comms(sched)                 # no deadlock under blocking sends and receives
    for r in range(pp):
        backward = [ins.mb for ins in sched.compute(r) if ins.op.value == "B"]
        forward = [ins.mb for ins in sched.compute(r) if ins.op.value == "F"]
        assert forward == list(range(sequences * n))
        assert backward == [s * n + j for s in range(sequences) for j in reversed(range(n))]
    # peak segments alive on rank 0: pp + N - 1 (capped by what there is), against 1F1B's pp sequences
    peak = peak_activations(sched)[0][0]
    assert peak == min(pp + n - 1, sequences * n)
    assert peak / n < min(pp, sequences) or (sequences == 1 and peak == n)
    one = simulate(build_schedule("1f1b", pp, sequences), Costs(F=1.0, B=2.0, W=1.0))
    seg = simulate(sched, Costs(F=1.0 / n, B=2.0 / n, W=1.0 / n))
    assert seg.bubble_fraction < one.bubble_fraction


def _model(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    init_weights(model, seed=1, std=0.02)
    return model


@pytest.mark.parametrize("mtp_depth,q_lora_rank,normalizer,recompute,alpha", [
    (1, 32, None, "none", 0.0), (2, 0, None, "none", 0.0), (1, 32, 37.0, "none", 0.0),
    (2, 32, None, "full", 0.0), (1, 0, None, "attention", 0.0),
    (2, 32, None, "none", 0.1), (1, 32, None, "moe", 0.1)])
def test_segments_compute_the_unsegmented_losses_and_gradients(mtp_depth, q_lora_rank, normalizer, recompute, alpha):
    """normalizer: SFT's loss (CE summed over the counted labels, some labels not counted, / a number).
    recompute: activation checkpointing, whose recomputed attention must read its segment's prefix again.
    alpha: the sequence-wise balance loss, whose f the segments take over the whole sequence (a large
    alpha, so that its gradient weighs in the comparison)."""
    cfg = ModelConfig(n_layers=3, n_dense_layers=1, mtp_depth=mtp_depth, q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    sequences, b, seq, n = 2, 2, 24, 4
    tokens = torch.randint(0, cfg.vocab_size, (sequences, b, seq))
    labels = torch.randint(0, cfg.vocab_size, (sequences, b, seq))
    if normalizer is not None:
        labels[torch.rand(labels.shape) < 0.3] = IGNORE

    whole = _model(cfg)
    balance = []
    for i in range(sequences):
        aux = StepAux(balance_coeff=alpha / sequences, loss_normalizer=normalizer)
        parts = whole.losses(tokens[i], labels[i], aux=aux)
        ((parts.main + LAMBDA * torch.stack(parts.mtp).mean()) / sequences).backward()
        balance.append(aux.balance_sum(torch.device("cpu")))
    reference = {k: p.grad for k, p in whole.named_parameters() if p.grad is not None}

    aux = StepAux(balance_coeff=alpha / sequences, loss_normalizer=normalizer, parts=SequenceParts())
    model, ctx = _model(copy.deepcopy(cfg)), StepContext(mtp_weight=LAMBDA, aux=aux)
    apply_activation_checkpointing(model, recompute)
    (stage,) = cut_model(model, StageLayout("seq1f1b", 1, cfg.n_layers, cfg.mtp_depth), 0, ctx)
    stage.carry = SegmentKV([stage.module, stage.loss_fn], ctx, n, seq // n)
    sched = build_schedule("seq1f1b", 1, sequences * n, n)
    executor = PipelineExecutor(sched, [stage], act_shape=(b, seq // n, cfg.dim), rank=0)
    L = seq // n
    inputs = [tokens[u // n][:, u % n * L:(u % n + 1) * L] for u in range(sequences * n)]
    targets = [(tokens[u // n], labels[u // n]) for u in range(sequences * n)]
    model.train()
    executor.step(inputs, targets)

    # each sequence's main and MTP losses, from its segments' (HeadLoss weighs them to the sequence's)
    main = torch.stack(ctx.main).view(sequences, n).mean(1)
    mtp = torch.stack(ctx.mtp).view(sequences, n).mean(1)
    with torch.no_grad():
        for i in range(sequences):
            parts = whole.losses(tokens[i], labels[i], aux=StepAux(loss_normalizer=normalizer))
            torch.testing.assert_close(main[i], parts.main, rtol=1e-5, atol=0)
            torch.testing.assert_close(mtp[i], torch.stack(parts.mtp).mean(), rtol=1e-5, atol=0)
    if alpha:   # the logged balance losses: the whole sequences' (summed over the MoE layers and sequences)
        torch.testing.assert_close(aux.parts.balance(torch.device("cpu")), torch.stack(balance).sum(),
                                   rtol=1e-5, atol=0)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(reference)
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-5, atol=1e-7, msg=k)
    assert not stage.carry.leaves and not stage.carry.roots        # nothing left between steps
