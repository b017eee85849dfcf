"""Data: preparing shards from user files, packing, the sampler, and the embedded corpus' determinism."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsv3.data.corpus import stdlib_documents
from dsv3.data.dataset import GlobalSampler, PackedDataset
from dsv3.data.shards import is_validation, read_meta, write_shards
from dsv3.data.tokenizer import EOS, train_bpe
from tests.helpers import ROOT, read_metrics, run_pretrain

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box and quack".split()


def make_corpus(directory, n_docs=300, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "a.jsonl"), "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(20, 80)))}) + "\n")
    with open(os.path.join(directory, "b.txt"), "w") as f:
        f.write(" ".join(rng.choice(WORDS, size=500)))
    return directory


def test_prepare_data_writes_shards_that_decode_back(tmp_path):
    corpus = make_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "shards")
    r = subprocess.run([sys.executable, "launch/prepare_data.py", corpus, "--out", out, "--vocab-size", "300",
                        "--val-fraction", "0.1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = read_meta(out)
    assert meta["documents"] == 301 and meta["dtype"] == "uint16"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    ds = PackedDataset(out, "train", 16)
    tokens = np.concatenate([ds.sample(i)[:-1] for i in range(len(ds))])
    text = tok.decode(tokens.tolist(), skip_special_tokens=False)
    assert EOS in text and "lazy" in text and "wizards" in text
    assert len(PackedDataset(out, "val", 16)) > 0


def test_prepare_data_with_a_bad_jsonl_key_exits_2(tmp_path):
    corpus = make_corpus(str(tmp_path / "corpus"))
    r = subprocess.run([sys.executable, "launch/prepare_data.py", corpus, "--out", str(tmp_path / "o"),
                        "--text-key", "body"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "body" in r.stderr


def test_training_runs_on_prepared_shards(tmp_path):
    corpus = make_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "shards")
    subprocess.run([sys.executable, "launch/prepare_data.py", corpus, "--out", out, "--vocab-size", "300",
                    "--val-fraction", "0.1"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    run = str(tmp_path / "run")
    r = run_pretrain(run, "+experiment=moe_tiny", "data=shards", f"data.path={out}", "data.seq_len=32",
                     "train.max_steps=2", "train.resume=none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2]


def test_the_split_does_not_depend_on_where_the_corpus_lies(tmp_path):
    """Document ids are relative to the input given: the same corpus in two places splits alike."""
    from dsv3.data.sources import file_documents
    from dsv3.data.shards import is_validation

    here, there = make_corpus(str(tmp_path / "here")), make_corpus(str(tmp_path / "elsewhere" / "deeper"))
    split = [[(doc_id, is_validation(doc_id, 0.1)) for doc_id, _ in file_documents([d])] for d in (here, there)]
    assert split[0] == split[1] and any(v for _, v in split[0]) and not all(v for _, v in split[0])


def test_packing_cuts_consecutive_windows_with_the_next_token(tmp_path):
    class Toy:
        def __init__(self):
            self.i = 0

        def get_vocab_size(self):
            return 10

        def token_to_id(self, t):
            return 0 if t == EOS else None

        def encode_batch(self, texts):
            return [type("E", (), {"ids": [int(c) for c in t]}) for t in texts]

        def save(self, path):
            open(path, "w").write("{}")

        def to_str(self):
            return "toy"

    docs = [(f"d{i}", "123456789"[: 3 + i % 7]) for i in range(12)]
    write_shards(str(tmp_path / "s"), docs, Toy(), val_fraction=0.3)
    ds = PackedDataset(str(tmp_path / "s"), "train", 4)
    stream = [int(c) for d, text in docs if not is_validation(d, 0.3) for c in text + "0"]
    assert len(ds) == (len(stream) - 1) // 4
    for i in range(len(ds)):
        assert ds.sample(i).tolist() == stream[4 * i:4 * i + 5]


def test_sampler_is_a_permutation_per_epoch_and_stateless():
    s = GlobalSampler(50, seed=3)
    epoch0, epoch1 = s(0, 50), s(50, 50)
    assert sorted(epoch0) == list(range(50)) == sorted(epoch1) and epoch0 != epoch1
    assert GlobalSampler(50, seed=3)(37, 20) == epoch0[37:] + epoch1[:7]  # resuming mid-way draws the same
    assert GlobalSampler(50, seed=4)(0, 50) != epoch0


def test_validation_split_is_stable_and_about_the_requested_size():
    ids = [f"doc{i}" for i in range(5000)]
    held = [i for i in ids if is_validation(i, 0.1)]
    assert 400 < len(held) < 600 and held == [i for i in ids if is_validation(i, 0.1)]


@pytest.mark.parametrize("vocab", [300])
def test_bpe_training_is_deterministic(vocab):
    docs = stdlib_documents()[:40]
    a = train_bpe((t for _, t in docs), vocab).to_str()
    b = train_bpe((t for _, t in docs), vocab).to_str()
    assert a == b


def test_embedded_corpus_is_the_standard_library():
    docs = stdlib_documents()
    names = [n for n, _ in docs]
    assert "os.py" in names and "json/decoder.py" in names and names == sorted(names)
    assert not any(n.startswith("test/") or "site-packages" in n for n in names)


def test_the_cache_lives_under_xdg_cache_home_or_home(monkeypatch, tmp_path):
    from dsv3.data.embedded import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty = unset, never the current directory
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "dsv3")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "dsv3")
