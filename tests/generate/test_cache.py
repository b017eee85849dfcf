"""The latent KV cache against the full forward: the absorbed form (decoding) and the naive form (its
check) give the full forward's logits at every step, fp32, 1e-5, with and without q compression, with YaRN."""
import pytest
import torch

from dsv3.generate import CachedDecoder, DecodeState, cache_bytes_per_token
from gen_cases import CASES, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; the two orders of summation differ by a few ulps (~5e-7 seen)


def new_state(model, batch, slots, mtp=True):
    return DecodeState.allocate(model, batch, slots, torch.float32, torch.device("cpu"), with_mtp=mtp)


@pytest.mark.parametrize("form", ["absorbed", "naive"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_logits_equal_full_forward_at_every_step(case, form):
    model = tiny_model(case)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
    decoder = CachedDecoder(model, form)
    state = new_state(model, 3, 40)
    _, logits, _, _ = decoder.forward(state, tokens[:, :7])  # a prefill, then one token at a time
    torch.testing.assert_close(logits, full[:, :7], **TOL)
    for i in range(7, 40):
        _, logits, _, positions = decoder.forward(state, tokens[:, i:i + 1])
        assert positions.tolist() == [[i]] * 3
        torch.testing.assert_close(logits[:, 0], full[:, i], **TOL)


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_left_padded_rows_equal_their_own_full_forward(form):
    model = tiny_model("q_compression_yarn")
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in (12, 4, 9)]
    P = 12
    ids = torch.zeros(3, P, dtype=torch.long)
    valid = torch.zeros(3, P, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):], valid[i, P - len(s):] = s[:P], True
    decoder = CachedDecoder(model, form)
    state = new_state(model, 3, P + 6)
    _, logits, _, _ = decoder.forward(state, ids, valid)
    nxt = torch.randint(0, model.cfg.vocab_size, (3, 6), generator=g)
    steps = [logits[:, -1]]
    for j in range(5):
        steps.append(decoder.forward(state, nxt[:, j:j + 1])[1][:, 0])
    for i, s in enumerate(seqs):
        with torch.no_grad():
            full = model(torch.cat([s, nxt[i, :5]])[None])[0]
        for j, got in enumerate(steps):
            torch.testing.assert_close(got[i], full[len(s) - 1 + j], **TOL)


def test_invalidated_slot_is_as_if_never_written():
    """A rejected draft's slot is masked and its position reused: the next token sees exactly the
    context without it."""
    model = tiny_model("no_q_compression")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    decoder = CachedDecoder(model, "absorbed")
    state = new_state(model, 2, 16)
    decoder.forward(state, tokens[:, :8])
    junk = torch.randint(0, model.cfg.vocab_size, (2, 2), generator=torch.Generator().manual_seed(9))
    _, _, start, _ = decoder.forward(state, junk)
    state.invalidate(torch.tensor([True, True]), start + 1)
    state.invalidate(torch.tensor([True, True]), start)
    _, logits, _, positions = decoder.forward(state, tokens[:, 8:10])
    assert positions.tolist() == [[8, 9]] * 2
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(logits, full[:, 8:10], **TOL)


def test_mtp_cache_equals_the_training_forward_of_the_mtp_module():
    """Cached MTP logits at every position equal those of the MTP path used for its training loss."""
    model = tiny_model("q_compression_yarn")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        h = model.hidden(tokens)
        module = model.mtp[0]
        cos, sin = model.rope(23)
        reference = model.head(module.norm(module(h[:, :23], model.embed(tokens[:, 1:]), cos, sin)))
    decoder = CachedDecoder(model, "absorbed")
    state = new_state(model, 2, 24)
    h1, _, start, pos = decoder.forward(state, tokens[:, :10])
    got = [decoder.mtp_forward(state, start, pos, h1, tokens[:, 1:11])]
    for i in range(10, 23):
        hi, _, start, pos = decoder.forward(state, tokens[:, i:i + 1])
        got.append(decoder.mtp_forward(state, start, pos, hi, tokens[:, i + 1:i + 2]))
    torch.testing.assert_close(torch.cat(got, dim=1), reference, **TOL)


def test_cache_holds_latents_only_and_its_size_is_mla_s():
    model = tiny_model("q_compression")
    cfg = model.cfg
    state = new_state(model, 2, 5)
    per_token = sum(c.kv.shape[-1] + c.pe.shape[-1] for c in [*state.layers.values(), *state.mtp.values()])
    assert per_token == (cfg.n_layers + cfg.mtp_depth) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    sizes = cache_bytes_per_token(cfg, dtype_bytes=4)
    assert sizes["mla_latent"] == per_token * 4
    assert sizes["multi_head"] == (cfg.n_layers + 1) * cfg.n_heads * (12 + 8 + 12) * 4


def test_forms_and_capacity_errors():
    model = tiny_model("q_compression")
    with pytest.raises(ValueError, match="attention='fast'"):
        CachedDecoder(model, "fast")
    state = new_state(model, 1, 4)
    with pytest.raises(RuntimeError, match="capacity 4"):
        CachedDecoder(model).forward(state, torch.zeros(1, 5, dtype=torch.long))
