"""Fill-in-Middle: the transform, which documents it picks, and the packed stream it produces."""
import numpy as np
import pytest

import dsv3.data.dataset as dataset_module
from dsv3.data.dataset import DocumentStream, PackedDataset
from dsv3.data.fim import Fim, transform, untransform, uniform
from dsv3.data.prepare import Options, prepare
from dsv3.data.shards import open_index, open_split, read_meta
from dsv3.data.tokenizer import train_bpe
from tests.data.test_prepare import make_corpus, texts

BEGIN, HOLE, END, EOS = 1001, 1002, 1003, 0


def test_a_rearranged_document_restores_the_original():
    rng = np.random.default_rng(0)
    fim = Fim(1.0, seed=7, stream=0, begin=BEGIN, hole=HOLE, end=END)
    cuts = []
    for doc in range(500):
        body = rng.integers(2, 1000, size=int(rng.integers(0, 40)))  # including empty documents
        original = np.concatenate([body, [EOS]])
        rearranged = transform(original, fim, doc)
        i, j = fim.cuts(doc, len(body))
        cuts.append((i, j, len(body)))
        assert len(rearranged) == len(original) + 3
        # PSM: <begin> prefix <hole> suffix <end> middle EOS
        expected = [BEGIN, *body[:i], HOLE, *body[j:], END, *body[i:j], EOS]
        assert rearranged.tolist() == expected
        assert (untransform(rearranged, BEGIN, HOLE, END) == original).all()
    # cut points are spread over the whole document: prefix, middle and suffix all get every size
    shares = np.array([(i / n, (j - i) / n) for i, j, n in cuts if n >= 10])
    assert 0.2 < shares[:, 0].mean() < 0.45 and 0.2 < shares[:, 1].mean() < 0.45  # E[min of 2 uniforms] = 1/3


def test_the_rate_is_met_and_choices_are_deterministic_per_document_and_seed():
    docs = np.arange(200_000)
    fim = Fim(0.1, seed=3, stream=0, begin=BEGIN, hole=HOLE, end=END)
    chosen = fim.chosen(docs)
    # binomial: sd = sqrt(0.1 * 0.9 / 2e5) = 6.7e-4; 5 sd
    assert abs(chosen.mean() - 0.1) < 5 * 6.7e-4
    assert (chosen == Fim(0.1, 3, 0, BEGIN, HOLE, END).chosen(docs)).all()  # another process, a resume
    assert (chosen[1000:2000] == fim.chosen(docs[1000:2000])).all()  # whatever is asked together
    other_seed, other_corpus = Fim(0.1, 4, 0, BEGIN, HOLE, END).chosen(docs), Fim(0.1, 3, 1, BEGIN, HOLE, END).chosen(docs)
    for other in (other_seed, other_corpus):  # independent draws: overlap of two 10% sets is about 1%
        assert abs((chosen & other).mean() - 0.01) < 0.002
    u = uniform(3, 0, docs)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two corpora files in 6 units, so the stream runs over several shard files."""
    root = tmp_path_factory.mktemp("fim")
    corpus = make_corpus(str(root / "c"), n_files=6, docs_per_file=60)
    train_bpe(texts(200, seed=5), 300).save(str(root / "tok.json"))
    prepare([corpus], str(root / "s"), tokenizer=str(root / "tok.json"), options=Options(val_fraction=0.1, unit_bytes=3000))
    return str(root / "s")


def reference_stream(directory, fim):
    """Each document read whole, rearranged if chosen, concatenated: the definition, without any indexing."""
    tokens, docs, d = [], [], 0
    for shard, ends in zip(open_split(directory, "train"), open_index(directory, "train")):
        start = 0
        for end in ends:
            doc = np.asarray(shard[start:end], dtype=np.int64)
            if fim.chosen(np.array([d]))[0]:
                doc = transform(doc, fim, d)
            tokens.append(doc)
            docs.append(np.full(len(doc), d))
            start, d = end, d + 1
    return np.concatenate(tokens), np.concatenate(docs)


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_packed_samples_are_windows_of_the_rearranged_documents(shards, rate, monkeypatch):
    monkeypatch.setattr(dataset_module, "BLOCK", 16)  # samples cross FIM blocks and shard files
    meta = read_meta(shards)
    fim = Fim(rate, seed=11, stream=0, begin=meta["fim_ids"][0], hole=meta["fim_ids"][1], end=meta["fim_ids"][2])
    ref_tokens, ref_docs = reference_stream(shards, fim)
    seq = 48
    ds = PackedDataset(shards, "train", seq, fim, documents=True)
    assert len(ds) == (len(ref_tokens) - 1) // seq
    batch = ds.batch(list(range(len(ds))))
    for i in range(len(ds)):
        assert batch.tokens[i].tolist() == ref_tokens[i * seq:i * seq + seq + 1].tolist()
        window = ref_docs[i * seq:i * seq + seq + 1]
        assert batch.documents[i].tolist() == (window - window[0]).tolist()
    # un-rearranging the stream's documents gives back the prepared documents, in order
    plain = DocumentStream(shards, "train")
    originals = plain.window(0, len(plain))[0]
    eos = meta["eos_id"]
    restored, doc = [], []
    for t in ref_tokens.tolist():
        doc.append(t)
        if t == eos:
            restored += untransform(np.array(doc), *meta["fim_ids"]).tolist() if doc[0] == meta["fim_ids"][0] else doc
            doc = []
    assert restored == originals.tolist()
    n_docs = ref_docs[-1] + 1
    assert (len(ref_tokens) - len(originals)) == 3 * fim.chosen(np.arange(n_docs)).sum()


def test_without_fim_the_samples_are_the_prepared_tokens(shards):
    plain = PackedDataset(shards, "train", 32)
    stream = np.concatenate([np.asarray(s, dtype=np.int64) for s in open_split(shards, "train")])
    assert len(plain) == (len(stream) - 1) // 32
    assert all(plain.sample(i).tolist() == stream[32 * i:32 * i + 33].tolist() for i in range(len(plain)))
