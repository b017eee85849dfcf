"""Token shards on disk: raw little-endian token ids (uint16 when the vocabulary fits, else uint32),
memory-mapped for reading, each with an index of where its documents end, described by a `meta.json`.

    <dir>/meta.json         {"format": 2, "dtype", "vocab_size", "eos_id", "fim_ids", "tokenizer_sha256", "documents",
                             "splits": {"train": [{"file", "tokens", "documents"}], "val": [...]}, ...}
    <dir>/tokenizer.json
    <dir>/train-00000-000.bin   token ids: the documents of a split, one after the other, each ending in EOS
    <dir>/train-00000-000.idx   int64: the end offset of each document in the .bin

A shard directory is written under a temporary name and renamed into place, and meta.json is replaced
atomically, so a crash never leaves a directory that looks complete. Directories written before the
document index existed (format 1, no .idx) train as before; document-level features need format 2.
"""
import hashlib
import json
import os
import shutil
from typing import Iterable

import numpy as np

from dsv3.data.tokenizer import eos_id, fim_ids, tokenizer_digest

META = "meta.json"
FORMAT = 2
SHARD_TOKENS = 1 << 28  # tokens per file at most (a file ends at the first document past it): 512 MiB of uint16
SPLITS = ("train", "val")


def is_validation(doc_id: str, fraction: float) -> bool:
    """Hold a document out by a hash of its id: stable whatever the order or number of documents."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def index_file(shard_file: str) -> str:
    return shard_file[:-len(".bin")] + ".idx"


class SplitWriter:
    """Streams the documents of one split of one unit of work to `<split>-<unit>-<part>.bin` files and
    their document indexes, starting a new file once one holds `max_tokens`."""

    def __init__(self, directory: str, split: str, unit: int, dtype: np.dtype, max_tokens: int = SHARD_TOKENS):
        self.directory, self.stem, self.dtype, self.max_tokens = directory, f"{split}-{unit:05d}", dtype, max_tokens
        self.files: list[dict] = []
        self._bin = self._idx = None

    def _rotate(self) -> None:
        self._close_file()
        name = f"{self.stem}-{len(self.files):03d}.bin"
        self.files.append({"file": name, "tokens": 0, "documents": 0})
        self._bin = open(os.path.join(self.directory, name), "wb")
        self._idx = open(os.path.join(self.directory, index_file(name)), "wb")

    def add(self, docs: list[np.ndarray]) -> None:
        """Append documents (each already ending in EOS)."""
        i = 0
        while i < len(docs):
            if self._bin is None or self.files[-1]["tokens"] >= self.max_tokens:
                self._rotate()
            f = self.files[-1]
            lengths = np.fromiter((len(d) for d in docs[i:]), dtype=np.int64, count=len(docs) - i)
            # documents up to the first one that reaches max_tokens stay in this file
            before = f["tokens"] + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            take = int(np.searchsorted(before, self.max_tokens, side="left")) or 1
            chunk = docs[i:i + take]
            ends = f["tokens"] + np.cumsum(lengths[:take])
            self._bin.write(np.concatenate(chunk).astype(self.dtype, copy=False).tobytes())
            self._idx.write(ends.astype(np.int64).tobytes())
            f["tokens"], f["documents"] = int(ends[-1]), f["documents"] + take
            i += take

    def _close_file(self) -> None:
        if self._bin is not None:
            self._bin.close()
            self._idx.close()
            self._bin = self._idx = None

    def close(self) -> list[dict]:
        self._close_file()
        return self.files


class UnitEncoder:
    """Tokenizes (id, text) documents, appends EOS, and routes each to the train or validation split of
    one unit of work by the hash of its id."""

    def __init__(self, directory: str, unit: int, tokenizer, val_fraction: float):
        self.tokenizer, self.val_fraction, self.eos = tokenizer, val_fraction, eos_id(tokenizer)
        dtype = token_dtype(tokenizer.get_vocab_size())
        self.writers = {s: SplitWriter(directory, s, unit, dtype) for s in SPLITS}
        self.documents = self.tokens = 0

    def add(self, batch: list[tuple[str, str]]) -> int:
        """Tokenize a batch; returns its number of tokens."""
        routed = {s: [] for s in SPLITS}
        encodings = self.tokenizer.encode_batch([text for _, text in batch])
        n = 0
        for (doc_id, _), enc in zip(batch, encodings):
            ids = np.asarray(enc.ids + [self.eos], dtype=np.int64)
            routed["val" if is_validation(doc_id, self.val_fraction) else "train"].append(ids)
            n += len(ids)
        for s, docs in routed.items():
            if docs:
                self.writers[s].add(docs)
        self.documents += len(batch)
        self.tokens += n
        return n

    def close(self) -> dict:
        return {"splits": {s: w.close() for s, w in self.writers.items()}, "documents": self.documents,
                "tokens": self.tokens}


def build_meta(tokenizer, splits: dict, documents: int, extra: dict | None = None) -> dict:
    for s in SPLITS:
        if not splits[s]:
            raise ValueError(f"the {s} split is empty ({documents} documents in all); give more documents or "
                             "change the validation fraction")
    vocab = tokenizer.get_vocab_size()
    fim = fim_ids(tokenizer)
    return {"format": FORMAT, "dtype": token_dtype(vocab).name, "vocab_size": vocab, "eos_id": eos_id(tokenizer),
            "fim_ids": list(fim) if fim else None, "tokenizer_sha256": tokenizer_digest(tokenizer),
            "documents": documents, "splits": splits, **(extra or {})}


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(out_dir: str, documents: Iterable[tuple[str, str]], tokenizer, val_fraction: float,
                 extra_meta: dict | None = None, batch_docs: int = 512) -> dict:
    """Tokenize (id, text) documents in one process, split train/val by id hash, write `out_dir` atomically.
    (launch/prepare_data.py does the same over files, in parallel and resumably.)"""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        encoder, batch = UnitEncoder(tmp, 0, tokenizer, val_fraction), []
        for doc in documents:
            batch.append(doc)
            if len(batch) == batch_docs:
                encoder.add(batch)
                batch = []
        if batch:
            encoder.add(batch)
        unit = encoder.close()
        meta = build_meta(tokenizer, unit["splits"], unit["documents"], {"units": 1, **(extra_meta or {})})
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        write_json_atomic(os.path.join(tmp, META), meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return meta


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, META)) as f:
        return json.load(f)


def open_split(directory: str, split: str) -> list[np.memmap]:
    """Read-only memory maps of one split's shard files."""
    meta = read_meta(directory)
    return [np.memmap(os.path.join(directory, s["file"]), dtype=meta["dtype"], mode="r", shape=(s["tokens"],))
            for s in meta["splits"][split]]


def open_index(directory: str, split: str) -> list[np.memmap]:
    """Read-only memory maps of the document end offsets of one split's shard files (format 2)."""
    meta = read_meta(directory)
    if meta.get("format", 1) < 2:
        raise ValueError(f"{directory} was prepared without a document index (an older launch/prepare_data.py); "
                         "prepare it again to use document-level features (data.fim_rate, data.document_masks)")
    return [np.memmap(os.path.join(directory, index_file(s["file"])), dtype=np.int64, mode="r",
                      shape=(s["documents"],)) for s in meta["splits"][split]]
