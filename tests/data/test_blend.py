"""Blends: realized proportions, statelessness (plan-independent, resumable), epochs, and their config rules."""
import logging

import numpy as np
import pytest

from dsv3.config.errors import ConfigError
from dsv3.config.schema import BlendEntry, Config
from dsv3.config.validate import validate
from dsv3.data.blend import PERIOD, Blend, BlendSchedule
from dsv3.data.dataset import PackedDataset
from dsv3.data.prepare import Options, prepare
from dsv3.data.tokenizer import train_bpe
from tests.data.test_prepare import make_corpus, texts

WEIGHTS = [[0.7, 0.2, 0.1], [1, 1], [5, 0, 3, 1e-3], list(np.random.default_rng(0).random(6))]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_realized_proportions_match_the_weights(weights):
    p = np.asarray(weights) / sum(weights)
    schedule = BlendSchedule(weights)
    n = 1_000_003  # not a whole number of periods
    corpus, _ = schedule.locate(np.arange(n))
    drawn = np.bincount(corpus, minlength=len(weights))
    # shares are exact to the period's rounding (1/PERIOD per corpus) plus the tail of an unfinished period
    assert np.abs(drawn / n - p).max() <= 1 / PERIOD + 3 / n
    assert (drawn == schedule.drawn(n)).all()
    # and close at every prefix: never more than a few samples away from the share
    counts = np.zeros(len(weights))
    worst = 0.0
    for start in range(0, 200_000, 10_000):
        block = corpus[start:start + 10_000]
        prefix = counts + np.cumsum(np.eye(len(weights))[block], axis=0)
        worst = max(worst, np.abs(prefix - np.outer(np.arange(start + 1, start + len(block) + 1), p)).max())
        counts = prefix[-1]
    assert worst < 4


@pytest.mark.parametrize("weights", WEIGHTS)
def test_each_corpus_draws_its_samples_in_order_without_gaps(weights):
    schedule = BlendSchedule(weights)
    corpus, k = schedule.locate(np.arange(3 * PERIOD + 123))
    for c in range(len(weights)):
        assert k[corpus == c].tolist() == list(range((corpus == c).sum()))


def test_bad_weights_are_refused():
    for weights in ([], [-1, 2], [0, 0], [1, float("nan")], [1, 1e-9]):
        with pytest.raises(ValueError, match="weight"):
            BlendSchedule(weights)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    train_bpe(texts(200, seed=5), 300).save(str(root / "tok.json"))
    big, small = make_corpus(str(root / "big"), 4, 60), make_corpus(str(root / "small"), 1, 20)
    dirs = []
    for name, corpus in (("web", big), ("tiny", small)):
        prepare([corpus], str(root / name), tokenizer=str(root / "tok.json"), options=Options(val_fraction=0.1))
        dirs.append(str(root / name))
    train_bpe(texts(200, seed=6), 280).save(str(root / "other.json"))
    prepare([small], str(root / "other"), tokenizer=str(root / "other.json"), options=Options(val_fraction=0.1))
    return dirs + [str(root / "other")]


def blend(dirs, seed=0):
    return Blend([PackedDataset(d, "train", 16) for d in dirs], [0.75, 0.25], ["web", "tiny"], seed, shuffle=True)


def test_samples_depend_on_the_global_index_only(corpora):
    whole = blend(corpora[:2]).batch(range(0, 96)).tokens
    # another process (a resume), asking in other pieces (other ranks and micro-batches), gets the same
    again = blend(corpora[:2])
    pieces = [again.batch(range(a, b)).tokens for a, b in ((0, 8), (8, 40), (40, 41), (41, 96))]
    assert (np.concatenate(pieces) == whole.numpy()).all()
    assert not (blend(corpora[:2], seed=1).batch(range(0, 96)).tokens == whole).all()
    # each sample is one of its corpus' samples
    web, tiny = (PackedDataset(d, "train", 16) for d in corpora[:2])
    corpus, _ = blend(corpora[:2]).schedule.locate(np.arange(96))
    pools = [{tuple(ds.sample(i).tolist()) for i in range(len(ds))} for ds in (web, tiny)]
    assert all(tuple(row.tolist()) in pools[c] for row, c in zip(whole, corpus))


def test_epochs_of_each_corpus_are_counted_and_a_repeat_is_logged(corpora, caplog):
    b = blend(corpora[:2])
    tiny = len(b.corpora[1])
    steps = int(2.5 * tiny / 0.25) // 32 + 1  # enough global batches of 32 for the small corpus to repeat twice
    with caplog.at_level(logging.INFO, logger="dsv3"):
        metrics = [b.report(32 * s, 32 * (s + 1), s + 1) for s in range(steps)]
    last = metrics[-1]
    assert last["data/epoch/tiny"] == pytest.approx(b.schedule.drawn(32 * steps)[1] / tiny)
    assert last["data/epoch/tiny"] > 2 and last["data/epoch/web"] < 1
    assert last["data/share/web"] == pytest.approx(0.75, abs=2 / (32 * steps))
    repeats = [r.getMessage() for r in caplog.records if "starts epoch" in r.getMessage()]
    assert len(repeats) == 2 and all(m.startswith("data: tiny starts epoch") for m in repeats)


def shards_config(**data):
    cfg = Config()
    cfg.data.source = "shards"
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_a_blend_of_differently_tokenized_corpora_is_refused(corpora):
    validate(shards_config(blend=[BlendEntry(corpora[0], 0.5), BlendEntry(corpora[1], 0.5)]))
    with pytest.raises(ConfigError, match=r"data.blend\[1\].path.*tokenizers differ"):
        validate(shards_config(blend=[BlendEntry(corpora[0], 0.5), BlendEntry(corpora[2], 0.5)]))
    with pytest.raises(ConfigError, match="data.blend.*positive sum"):
        validate(shards_config(blend=[BlendEntry(corpora[0], 0.0), BlendEntry(corpora[1], 0.0)]))
    with pytest.raises(ConfigError, match="data.blend.*replaces data.path"):
        validate(shards_config(path=corpora[0], blend=[BlendEntry(corpora[1], 1.0)]))
    with pytest.raises(ConfigError, match="data.fim_rate"):
        validate(shards_config(path=corpora[0], fim_rate=1.5))
    cfg = shards_config(path=corpora[0], document_masks=True)
    cfg.parallel.pp = 2
    with pytest.raises(ConfigError, match="data.document_masks"):
        validate(cfg, world_size=2)


def test_training_on_a_blend_with_fim_and_masks_resumes_exactly(corpora, tmp_path):
    from tests.helpers import read_metrics, run_pretrain

    args = ["+experiment=moe_tiny", "data=shards", "data.seq_len=32", "data.fim_rate=0.5", "data.document_masks=true",
            f"data.blend=[{{path:{corpora[0]},weight:3}},{{path:{corpora[1]},weight:1,name:tiny}}]"]
    ref, cut = str(tmp_path / "reference"), str(tmp_path / "cut")
    r = run_pretrain(ref, *args, "train.max_steps=6", "train.resume=none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "web 75.0% of samples" in r.stdout and "FIM on 50%" in r.stdout and "document boundaries" in r.stdout
    assert run_pretrain(cut, *args, "train.max_steps=3", "train.resume=none").returncode == 0
    r = run_pretrain(cut, *args, "train.max_steps=6")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    reference, resumed = read_metrics(ref), read_metrics(cut)[3:]
    assert [m["step"] for m in resumed] == [4, 5, 6]
    for a, b in zip(reference[3:], resumed):
        assert a["loss"] == b["loss"] and a["mtp_loss"] == b["mtp_loss"]
        assert a["data/epoch/tiny"] == b["data/epoch/tiny"]
    last = reference[-1]  # 6 steps of 8 samples: 36 web, 12 tiny
    assert last["data/share/web"] == 0.75 and last["data/share/tiny"] == 0.25
    samples = 36 / last["data/epoch/web"]  # per epoch: more than without FIM, whose documents are 3 tokens longer
    assert samples == pytest.approx(round(samples), abs=1e-6) and round(samples) > len(PackedDataset(corpora[0], "train", 32))
