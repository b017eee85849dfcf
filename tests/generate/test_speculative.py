"""Self-speculative decoding with the MTP module: greedy output identical to plain greedy decoding;
speculative sampling draws from the target distribution (a chi-square test against the exact one)."""
import math

import pytest
import torch

from dsv3.generate import Generator, SamplingParams
from dsv3.generate.sampling import sampling_logprobs
from gen_cases import make_mtp_echo, prompts, tiny_model


@pytest.mark.parametrize("case", ["q_compression_yarn", "no_q_compression"])
def test_speculative_greedy_equals_plain_greedy_token_for_token(case):
    model = make_mtp_echo(tiny_model(case, std=0.1))
    ps = prompts(model.cfg.vocab_size, lengths=(5, 2, 9, 1, 3, 7))
    gen = Generator(model)
    plain = gen.generate(ps, SamplingParams(max_new_tokens=30, temperature=0))
    spec = gen.generate(ps, SamplingParams(max_new_tokens=30, temperature=0, speculative="mtp"))
    assert [c.tokens for c in spec.completions] == [c.tokens for c in plain.completions]
    for a, b in zip(spec.completions, plain.completions):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)
    rate = spec.stats["acceptance_rate"]
    print(f"acceptance rate {rate:.2f}, row-steps {spec.stats['row_steps']} vs {plain.stats['row_steps']}")
    assert 0.05 < rate < 0.95, "the test needs both accepted and rejected drafts"  # both paths exercised
    assert spec.stats["row_steps"] < plain.stats["row_steps"]  # decoding steps per row: fewer


def test_speculative_greedy_with_an_untrained_mtp_still_equals_plain():
    model = tiny_model("q_compression", std=0.1)  # random MTP: drafts almost always rejected
    ps = prompts(model.cfg.vocab_size)
    gen = Generator(model)
    plain = gen.generate(ps, SamplingParams(max_new_tokens=15, temperature=0))
    spec = gen.generate(ps, SamplingParams(max_new_tokens=15, temperature=0, speculative="mtp"))
    assert [c.tokens for c in spec.completions] == [c.tokens for c in plain.completions]


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.999 quantile of chi-square(df), Wilson-Hilferty (accurate to ~1% for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_pair_distribution(model, prompt, params) -> dict[tuple[int, int], float]:
    """P(t1, t2) of plain sampling, by enumeration over the kept t1."""
    with torch.no_grad():
        p1 = sampling_logprobs(model(torch.tensor([prompt]))[:, -1], params)[0].exp()
        firsts = p1.nonzero()[:, 0]
        seqs = torch.tensor([prompt + [int(t)] for t in firsts])
        p2 = sampling_logprobs(model(seqs)[:, -1], params).exp()
    return {(int(t1), int(t2)): float(p1[t1] * p2[i, t2])
            for i, t1 in enumerate(firsts) for t2 in p2[i].nonzero()[:, 0]}


def chi_square(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count < 5 pooled into one."""
    stat, df, pooled_o, pooled_e = 0.0, -1, 0, 0.0
    for cell, p in expected.items():
        e, o = n * p, counts.get(cell, 0)
        if e < 5:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
        else:
            stat, df = stat + (o - e) ** 2 / e, df + 1
    outside = sum(v for k, v in counts.items() if k not in expected)
    assert outside == 0, f"{outside} samples outside the support"
    if pooled_e > 0:
        stat, df = stat + (pooled_o - pooled_e) ** 2 / pooled_e, df + 1
    return stat, df


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_speculative_sampling_keeps_the_target_distribution(speculative):
    """The first two sampled tokens of N = 6000 samples against the exact joint distribution. The second
    token of the speculative run comes from the draft/verify step (the first from the prefill). With a
    fixed seed the outcome is deterministic; the threshold is the 0.999 quantile."""
    model = make_mtp_echo(tiny_model("q_compression", std=0.1))
    prompt = prompts(model.cfg.vocab_size, lengths=(6,))[0]
    params = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=5, num_samples=6000, seed=7,
                            speculative=speculative)
    exact = exact_pair_distribution(model, prompt, params)
    out = Generator(model).generate([prompt], params)
    counts: dict = {}
    for c in out.completions:
        counts[tuple(c.tokens)] = counts.get(tuple(c.tokens), 0) + 1
    stat, df = chi_square(counts, exact, len(out.completions))
    assert stat < chi_square_critical(df), (stat, df)
    if speculative:
        rate = out.stats["acceptance_rate"]
        assert 0.1 < rate < 0.9, rate  # both the accept and the resample paths were taken
        # The test can fail: had every (echo) draft been accepted, t2 would equal t1; that distribution,
        # at the same sample size, is far beyond the threshold.
        always_accept: dict = {}
        for (t1, _), p in exact.items():
            always_accept[(t1, t1)] = always_accept.get((t1, t1), 0) + round(p * len(out.completions))
        kept = {k: v for k, v in always_accept.items() if k in exact}
        bad_stat, bad_df = chi_square(kept, exact, sum(kept.values()))
        assert bad_stat > 10 * chi_square_critical(bad_df)
