"""Preparing shards from users' files: every format, parallel workers, resume, append, bad input."""
import filecmp
import gzip
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from dsv3.data import prepare as prep
from dsv3.data.dataset import PackedDataset
from dsv3.data.prepare import Options, prepare
from dsv3.data.shards import read_meta
from dsv3.data.sources import InputError, file_documents
from dsv3.data.tokenizer import EOS, FIM_TOKENS, fim_ids, train_bpe
from tests.helpers import ROOT

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box and quack".split()


def texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 60))) for _ in range(n)]


def write_jsonl(path, docs, key="text"):
    opener = {"gz": gzip.open, "zst": lambda p, m: __import__("zstandard").open(p, m)}.get(path.rsplit(".", 1)[-1], open)
    with opener(path, "wt") as f:
        for t in docs:
            f.write(json.dumps({key: t, "id": 0}) + "\n")


def write_parquet(path, docs, key="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: docs, "n": list(range(len(docs)))}), path, row_group_size=7)


def make_corpus(root, n_files=6, docs_per_file=40):
    """A directory of every format, about 2 KB per file."""
    os.makedirs(root, exist_ok=True)
    for i in range(n_files):
        docs = texts(docs_per_file, seed=i)
        kind = i % 4
        if kind == 0:
            write_jsonl(os.path.join(root, f"part{i}.jsonl"), docs)
        elif kind == 1:
            write_jsonl(os.path.join(root, f"part{i}.jsonl.gz"), docs)
        elif kind == 2:
            write_jsonl(os.path.join(root, f"part{i}.jsonl.zst"), docs)
        else:
            write_parquet(os.path.join(root, f"part{i}.parquet"), docs)
    return root


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe(texts(200, seed=99), 300).save(path)
    return path


def files_of(directory):
    return sorted(os.listdir(directory))


def assert_same_directories(a, b):
    assert files_of(a) == files_of(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, [f for f in files_of(a) if f != "meta.json"], shallow=False)
    assert not mismatch and not errors
    ma, mb = read_meta(a), read_meta(b)
    ma.pop("source"), mb.pop("source")
    assert ma == mb


def test_every_format_yields_the_same_documents(tmp_path):
    docs = texts(30, seed=1)
    write_jsonl(str(tmp_path / "a.jsonl"), docs)
    write_jsonl(str(tmp_path / "a.jsonl.gz"), docs)
    write_jsonl(str(tmp_path / "a.jsonl.zst"), docs)
    write_parquet(str(tmp_path / "a.parquet"), docs)
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": docs})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)  # several Arrow files, read in order
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet", "saved", "dict"):
        read = list(file_documents([str(tmp_path / name)]))
        assert [t for _, t in read] == docs, name
        assert len({i for i, _ in read}) == len(docs)  # ids are unique: they choose the validation split


def test_a_tokenizer_json_of_another_kind_gets_the_fim_sentinels(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "word.json"))
    corpus = make_corpus(str(tmp_path / "c"), n_files=2)
    meta = prepare([corpus], str(tmp_path / "out"), tokenizer=str(tmp_path / "word.json"),
                   options=Options(val_fraction=0.1))
    assert meta["eos_id"] == 1 and meta["vocab_size"] == len(vocab) + 3
    assert meta["fim_ids"] == list(range(len(vocab), len(vocab) + 3))
    from tokenizers import Tokenizer as T

    saved = T.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert fim_ids(saved) == tuple(meta["fim_ids"]) and [saved.id_to_token(i) for i in meta["fim_ids"]] == list(FIM_TOKENS)
    ids = np.fromfile(str(tmp_path / "out" / meta["splits"]["train"][0]["file"]), dtype=np.uint16)
    assert set(ids.tolist()) <= set(range(len(vocab))) and (ids == 1).sum() == meta["splits"]["train"][0]["documents"]


def test_shards_do_not_depend_on_the_number_of_workers(tmp_path, tokenizer_file, caplog):
    """Two worker processes (the command line) write byte for byte what one (in this process) writes."""
    corpus = make_corpus(str(tmp_path / "c"))
    opts = Options(val_fraction=0.1, unit_bytes=3000)  # 6 files of 1.5-9 KB: 5 units, one of two files
    with caplog.at_level(logging.INFO):
        meta = prepare([corpus], str(tmp_path / "one"), tokenizer=tokenizer_file, options=opts, progress_every=0)
    assert meta["units"] == 5 and meta["documents"] == 240
    assert any("tokens/s" in r.getMessage() and "prepare 100%" in r.getMessage() for r in caplog.records)
    r = subprocess.run([sys.executable, "launch/prepare_data.py", corpus, "--out", str(tmp_path / "two"),
                        "--tokenizer", tokenizer_file, "--val-fraction", "0.1", "--unit-mb", str(3000 / 2**20),
                        "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 workers" in r.stderr and "tokens/s" in r.stderr
    assert_same_directories(str(tmp_path / "one"), str(tmp_path / "two"))
    assert not os.path.exists(str(tmp_path / "two.partial"))


def test_an_interrupted_preparation_resumes_to_the_same_shards(tmp_path, tokenizer_file, monkeypatch):
    corpus = make_corpus(str(tmp_path / "c"))
    opts = Options(val_fraction=0.1, unit_bytes=3000)
    prepare([corpus], str(tmp_path / "whole"), tokenizer=tokenizer_file, options=opts)

    real, seen = prep.read_documents, []

    def dies_in_the_second_unit(source, text_key):
        seen.append(source.name)
        for i, doc in enumerate(real(source, text_key)):
            if source.name == "part2.jsonl.zst" and i == 10:  # unit 1 = part1 + part2: part1 is written
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(prep, "BATCH_DOCS", 8)  # write as it reads, so the interrupted unit leaves files
    monkeypatch.setattr(prep, "read_documents", dies_in_the_second_unit)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], str(tmp_path / "out"), tokenizer=tokenizer_file, options=opts)
    partial = str(tmp_path / "out.partial")
    assert not os.path.exists(tmp_path / "out") and os.path.isfile(os.path.join(partial, "unit-00000.json"))
    assert not os.path.exists(os.path.join(partial, "unit-00001.json"))
    assert any(f.startswith("train-00001") for f in os.listdir(partial))  # half a unit, to be redone

    seen.clear()
    monkeypatch.setattr(prep, "read_documents", lambda s, k: (seen.append(s.name), real(s, k))[1])
    prepare([corpus], str(tmp_path / "out"), tokenizer=tokenizer_file, options=opts)
    assert seen == sorted(os.listdir(corpus))[1:]  # unit 0 (part0) was not read again
    assert_same_directories(str(tmp_path / "whole"), str(tmp_path / "out"))
    assert not os.path.exists(partial)


def test_appending_gives_the_samples_of_one_preparation_of_everything(tmp_path, tokenizer_file):
    first, more = make_corpus(str(tmp_path / "first"), 3), make_corpus(str(tmp_path / "more"), 2)
    opts = Options(val_fraction=0.1, unit_bytes=3000)
    prepare([first, more], str(tmp_path / "at_once"), tokenizer=tokenizer_file, options=opts)
    prepare([first], str(tmp_path / "grown"), tokenizer=tokenizer_file, options=opts)
    before = read_meta(str(tmp_path / "grown"))
    meta = prepare([more], str(tmp_path / "grown"), options=opts, append=True)
    assert meta["documents"] == before["documents"] + 80 and meta["splits"]["train"][:2] == before["splits"]["train"][:2]
    for split in ("train", "val"):
        a, b = PackedDataset(str(tmp_path / "at_once"), split, 16), PackedDataset(str(tmp_path / "grown"), split, 16)
        assert len(a) == len(b) and all((a.sample(i) == b.sample(i)).all() for i in range(len(a)))
    with pytest.raises(InputError, match="already holds prepared shards"):
        prepare([more], str(tmp_path / "grown"), options=opts)


def _bad(tmp_path, case):
    good = str(tmp_path / "good.jsonl")
    write_jsonl(good, texts(20, 0))
    if case == "empty file":
        open(tmp_path / "empty.jsonl", "w").close()
        return [good, str(tmp_path / "empty.jsonl")], {}, "empty.jsonl"
    if case == "missing column":
        write_parquet(str(tmp_path / "t.parquet"), texts(5, 0), key="content")
        return [good, str(tmp_path / "t.parquet")], {}, "no column 'text'.*content"
    if case == "missing field":
        write_jsonl(str(tmp_path / "b.jsonl"), texts(5, 0), key="body")
        return [str(tmp_path / "b.jsonl")], {}, "b.jsonl:1: no 'text' field"
    if case == "corrupt gzip":
        (tmp_path / "c.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not deflate")
        return [good, str(tmp_path / "c.jsonl.gz")], {}, "c.jsonl.gz: unreadable"
    if case == "not json":
        (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
        return [str(tmp_path / "n.jsonl")], {}, "n.jsonl:2: not a JSON object"
    if case == "unknown format":
        (tmp_path / "x.csv").write_text("a,b\n")
        return [str(tmp_path / "x.csv")], {}, "x.csv: unknown format"
    if case == "missing path":
        return [str(tmp_path / "nowhere")], {}, "nowhere"
    if case == "empty validation split":
        return [good], {"val_fraction": 0.001}, "the val split is empty"
    if case == "no tokenizer":
        return [good], {}, "missing.json: not a readable tokenizer.json"


@pytest.mark.parametrize("case", ["empty file", "missing column", "missing field", "corrupt gzip", "not json",
                                  "unknown format", "missing path", "empty validation split", "no tokenizer"])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, tokenizer_file, case):
    inputs, opts, message = _bad(tmp_path, case)
    tok = str(tmp_path / "missing.json") if case == "no tokenizer" else tokenizer_file
    with pytest.raises((InputError, FileNotFoundError, ValueError), match=message):
        prepare(inputs, str(tmp_path / "out"), tokenizer=tok, options=Options(**opts))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_the_command_line_exits_2_on_bad_input(tmp_path):
    write_parquet(str(tmp_path / "t.parquet"), texts(5, 0), key="content")
    r = subprocess.run([sys.executable, "launch/prepare_data.py", str(tmp_path / "t.parquet"), "--out",
                        str(tmp_path / "o"), "--vocab-size", "300"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "t.parquet" in r.stderr and "'text'" in r.stderr
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_the_documents_end_with_eos_where_the_index_says(tmp_path, tokenizer_file):
    corpus = make_corpus(str(tmp_path / "c"), 2)
    meta = prepare([corpus], str(tmp_path / "o"), tokenizer=tokenizer_file, options=Options(val_fraction=0.1))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    for f in meta["splits"]["train"]:
        ids = np.fromfile(str(tmp_path / "o" / f["file"]), dtype=np.uint16)
        ends = np.fromfile(str(tmp_path / "o" / f["file"].replace(".bin", ".idx")), dtype=np.int64)
        assert ends[-1] == len(ids) and (ids[ends - 1] == tok.token_to_id(EOS)).all()
        assert (ids == tok.token_to_id(EOS)).sum() == len(ends) == f["documents"]


def test_a_missing_optional_reader_says_what_to_install(tmp_path, monkeypatch):
    write_parquet(str(tmp_path / "t.parquet"), texts(5, 0))
    write_jsonl(str(tmp_path / "t.jsonl.zst"), texts(5, 0))
    for module, name in (("pyarrow", "t.parquet"), ("zstandard", "t.jsonl.zst")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # `import module` now raises ImportError
            with pytest.raises(InputError, match=rf"{name}.*needs the `{module}` package: pip install -e '.\[data\]'"):
                list(file_documents([str(tmp_path / name)]))
