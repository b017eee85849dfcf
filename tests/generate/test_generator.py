"""Batched generation: greedy against a cache-free reference, padding either side, seeded and
batch-independent sampling, per-token log-probs against the training forward, stops, truncation, errors."""
import pytest
import torch

from dsv3.data.tokenizer import EOS, train_bpe
from dsv3.generate import Generator, SamplingParams, prompts_from_padded
from dsv3.generate.sampling import sampling_logprobs
from gen_cases import greedy_without_cache, prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("q_compression_yarn", std=0.1)


def test_greedy_equals_recomputing_the_full_forward(model):
    ps = prompts(model.cfg.vocab_size)
    out = Generator(model).generate(ps, SamplingParams(max_new_tokens=12, temperature=0))
    for c, p in zip(out.completions, ps):
        assert c.tokens == greedy_without_cache(model, p, 12)
        assert c.finish_reason == "length"


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_left_and_right_padded_batches_give_the_unbatched_result(model, form):
    ps = prompts(model.cfg.vocab_size, lengths=(6, 3, 8))
    params = SamplingParams(max_new_tokens=6, temperature=0.8, num_samples=2, seed=3)
    gen = Generator(model, attention=form)
    alone = [gen.generate([p], params, prompt_ids=[i]).completions for i, p in enumerate(ps)]
    for side in ("left", "right"):
        ids = torch.zeros(3, 8, dtype=torch.long)
        mask = torch.zeros(3, 8, dtype=torch.long)
        for i, p in enumerate(ps):
            sl = slice(8 - len(p), 8) if side == "left" else slice(0, len(p))
            ids[i, sl], mask[i, sl] = torch.tensor(p), 1
        batched = gen.generate(prompts_from_padded(ids, mask), params).completions
        for i in range(3):
            assert [c.tokens for c in batched[2 * i:2 * i + 2]] == [c.tokens for c in alone[i]]


def test_sampling_is_seeded_and_each_row_independent_of_its_batch(model):
    ps = prompts(model.cfg.vocab_size)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=4, seed=11)
    gen = Generator(model)
    a = [c.tokens for c in gen.generate(ps, params).completions]
    assert a == [c.tokens for c in gen.generate(ps, params).completions]
    # the rows of prompt 2 alone, with its global id: the same samples (what data parallelism relies on)
    assert a[8:12] == [c.tokens for c in gen.generate([ps[2]], params, prompt_ids=[2]).completions]
    other = [c.tokens for c in gen.generate(ps, SamplingParams(max_new_tokens=10, num_samples=4, seed=12)).completions]
    assert a != other
    assert len({tuple(t) for t in a[:4]}) > 1, "the G samples of one prompt should differ"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_the_training_forward_on_prompt_plus_completion(model, temperature):
    """What an RL trainer recomputes: log softmax(logits / T) of each completion token given its prefix."""
    ps = prompts(model.cfg.vocab_size, lengths=(4, 7))
    out = Generator(model).generate(ps, SamplingParams(max_new_tokens=9, temperature=temperature, num_samples=2,
                                                       top_k=20, seed=1))
    for c in out.completions:
        seq = torch.tensor([c.prompt_tokens + c.tokens])
        with torch.no_grad():
            logits = model(seq)[0, len(c.prompt_tokens) - 1:-1].float()
        ref = torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=1e-5, atol=1e-5)


def test_top_k_and_top_p_keep_only_their_sets(model):
    ps = prompts(model.cfg.vocab_size, lengths=(5,))
    for kw in (dict(top_k=3), dict(top_p=0.3)):
        params = SamplingParams(max_new_tokens=6, temperature=1.5, num_samples=16, seed=2, **kw)
        for c in Generator(model).generate(ps, params).completions:
            seq = c.prompt_tokens + c.tokens
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[0, len(c.prompt_tokens) - 1:-1]
            allowed = sampling_logprobs(logits, params).isfinite()
            assert allowed[torch.arange(len(c.tokens)), torch.tensor(c.tokens)].all()
            assert (allowed.sum(-1) <= kw.get("top_k", 10**9)).all()


def test_sampling_distribution_top_p_is_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = sampling_logprobs(logits, SamplingParams(top_p=0.8)).isfinite()
    assert keep.tolist() == [[True, True, False, False]]
    keep = sampling_logprobs(logits, SamplingParams(top_p=0.81)).isfinite()
    assert keep.tolist() == [[True, True, True, False]]
    assert sampling_logprobs(logits, SamplingParams(top_p=0.8)).exp().sum().item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tokenizer():
    text = ["the answer is </answer> and more text here", "abc def ghi </answer> jkl"] * 20
    return train_bpe(text, 300)


def test_stop_token_and_stop_string_end_a_completion(model, tokenizer):
    vocab = tokenizer.get_vocab_size()
    m = tiny_model("q_compression", std=0.1, vocab_size=vocab)
    gen = Generator(m, tokenizer)
    ps = prompts(vocab, lengths=(4, 6))
    free = gen.generate(ps, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=()))
    stop_tok = free.completions[0].tokens[5]
    stopped = gen.generate(ps, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=(stop_tok,)))
    c = stopped.completions[0]
    assert c.tokens == free.completions[0].tokens[:free.completions[0].tokens.index(stop_tok) + 1]
    assert c.finish_reason == "stop"
    # a stop string made of the decoded text of tokens 3..4 of the second completion
    ref = free.completions[1]
    target = tokenizer.decode(ref.tokens[3:5], skip_special_tokens=False)
    by_string = gen.generate(ps, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=(),
                                                stop_strings=(target,))).completions[1]
    assert by_string.finish_reason == "stop"
    assert len(by_string.tokens) <= 5 and by_string.text.endswith(target)
    assert target not in by_string.text[:-len(target)] or by_string.text.count(target) == 1


def test_default_stop_is_the_tokenizers_eos(tokenizer):
    eos = tokenizer.token_to_id(EOS)
    m = tiny_model("q_compression", std=0.1, vocab_size=tokenizer.get_vocab_size())
    first = Generator(m, tokenizer).generate(["the answer"], SamplingParams(max_new_tokens=1, temperature=0))
    first = first.completions[0].tokens[0]
    with torch.no_grad():  # swap the head rows of EOS and the greedy first token: EOS comes first
        m.head.weight[[eos, first]] = m.head.weight[[first, eos]]
    c = Generator(m, tokenizer).generate(["the answer"], SamplingParams(max_new_tokens=8, temperature=0)).completions[0]
    assert c.tokens == [eos] and c.finish_reason == "stop"


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_completions_end_at_the_context(speculative):
    model = tiny_model("q_compression", max_seq_len=16)
    out = Generator(model).generate([[1] * 12, [2] * 3], SamplingParams(max_new_tokens=50, temperature=0,
                                                                        speculative=speculative))
    assert [len(c.tokens) for c in out.completions] == [4, 13]
    assert all(c.finish_reason == "length" for c in out.completions)


@pytest.mark.parametrize("params,match", [
    (dict(temperature=-1), "temperature=-1"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_k=-2), "top_k=-2"),
    (dict(max_new_tokens=0), "max_new_tokens=0"), (dict(num_samples=0), "num_samples=0"),
    (dict(speculative="medusa"), "speculative='medusa'"),
])
def test_bad_sampling_values_are_named(model, params, match):
    with pytest.raises(ValueError, match=match):
        Generator(model).generate([[1, 2]], SamplingParams(**params))


def test_bad_prompts_and_missing_mtp_are_refused(model):
    gen = Generator(model)
    with pytest.raises(ValueError, match="max_seq_len=256"):
        gen.generate([[1] * 256], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        gen.generate([[1000]], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        gen.generate(["text"], SamplingParams())
    with pytest.raises(ValueError, match="mtp_depth=0"):
        Generator(tiny_model(mtp_depth=0)).generate([[1]], SamplingParams(speculative="mtp"))


def test_padded_result_for_rl(model):
    out = Generator(model).generate(prompts(model.cfg.vocab_size, (3, 5)),
                                    SamplingParams(max_new_tokens=5, temperature=1, num_samples=3, seed=0))
    ids, logp, mask = out.padded(pad_id=0)
    assert ids.shape == logp.shape == mask.shape == (6, 5)
    for i, c in enumerate(out.completions):
        assert ids[i, mask[i]].tolist() == c.tokens
        assert (c.prompt_index, c.sample_index) == (i // 3, i % 3)
