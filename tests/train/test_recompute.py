"""Activation checkpointing (train.activation_checkpointing): the recomputation is the forward again,
so losses, every gradient, the router's token counts and the balance losses are bit-identical to keeping the activations,
and the measured peak memory of a forward + backward is lower (dsv3/train/memory.py: allocated bytes
sampled after every operation)."""
import pytest
import torch

from dsv3.config.schema import Fp8Config, ModelConfig
from dsv3.fp8.convert import convert_to_fp8
from dsv3.model import Transformer, init_weights
from dsv3.model.step_aux import StepAux
from dsv3.train.memory import PeakMemory
from dsv3.train.recompute import apply_activation_checkpointing

# Wide enough that activations, not weights, dominate: 8 x 256 tokens, each sent to 4 experts.
CFG = ModelConfig(vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=2, n_dense_layers=1,
                  n_heads=4, n_routed_experts=8, n_activated_experts=4, max_seq_len=256, mtp_depth=1)


def step(mode: str, fp8: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, list, int]:
    torch.manual_seed(0)
    model = Transformer(CFG)
    init_weights(model, seed=1, std=0.02)
    if fp8:   # the emulated recipe: the recomputation quantizes the same inputs again, to the same bits
        convert_to_fp8(model, Fp8Config(), "reference")
    apply_activation_checkpointing(model, mode)
    shape = (2, 129) if fp8 else (8, 257)   # the emulation is slow; equality needs no size
    tokens = torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(2))
    aux = StepAux(balance_coeff=1e-2)
    with PeakMemory("cpu") as mem:
        parts = model.losses(tokens[:, :-1], tokens[:, 1:], None, aux)
        loss = parts.main + 0.3 * torch.stack(parts.mtp).mean()
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # read after the backward: a recomputed forward must not have recorded again
    loads = torch.stack([aux.loads[m] for m in model.moe_layers()])
    return loss.detach(), grads, loads, aux.balance, mem.peak_bytes - mem.start_bytes


@pytest.fixture(scope="module")
def kept():
    return step("none")


@pytest.mark.parametrize("mode", ["full", "moe", "attention"])
def test_recomputation_is_bit_identical_and_needs_less_memory(kept, mode):
    loss, grads, loads, balance, peak = step(mode)
    ref_loss, ref_grads, ref_loads, ref_balance, ref_peak = kept
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n
    # the step's records are the first forward's only: counts not replaced, balance losses not repeated
    assert torch.equal(loads, ref_loads)
    assert len(balance) == len(ref_balance) == len(loads) and all(map(torch.equal, balance, ref_balance))
    assert peak < 0.9 * ref_peak, (mode, peak, ref_peak)


def test_recomputation_under_fp8_is_bit_identical():
    loss, grads, loads, balance, _ = step("full", fp8=True)
    ref_loss, ref_grads, ref_loads, ref_balance, _ = step("none", fp8=True)
    assert torch.equal(loss, ref_loss) and torch.equal(loads, ref_loads) and len(balance) == len(ref_balance)
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="must be one of none, full, moe, attention"):
        apply_activation_checkpointing(Transformer(CFG), "everything")
