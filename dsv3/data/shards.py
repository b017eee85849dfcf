"""Token shards on disk: raw little-endian token ids (uint16 when the vocabulary fits, else uint32),
memory-mapped for reading, described by a `meta.json`. A shard directory is written under a temporary
name and renamed into place, so a crash never leaves a directory that looks complete.

    <dir>/meta.json         {"dtype", "vocab_size", "eos_id", "splits": {"train": [{"file", "tokens"}], "val": [...]}}
    <dir>/tokenizer.json
    <dir>/train-00000.bin ...
"""
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer

from dsv3.data.tokenizer import eos_id

log = logging.getLogger(__name__)
META = "meta.json"
SHARD_TOKENS = 1 << 28  # tokens per file: 512 MiB of uint16


def is_validation(doc_id: str, fraction: float) -> bool:
    """Hold a document out by a hash of its id: stable whatever the order or number of documents."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


class _SplitWriter:
    def __init__(self, directory: str, split: str, dtype: np.dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.files: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: list[int]) -> None:
        self._buf.append(np.asarray(ids, dtype=self.dtype))
        self._buffered += len(ids)
        if self._buffered >= SHARD_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        name = f"{self.split}-{len(self.files):05d}.bin"
        np.concatenate(self._buf).tofile(os.path.join(self.directory, name))
        self.files.append({"file": name, "tokens": self._buffered})
        self._buf, self._buffered = [], 0

    def close(self) -> list[dict]:
        self._flush()
        return self.files


def write_shards(out_dir: str, documents: Iterable[tuple[str, str]], tokenizer: Tokenizer, val_fraction: float,
                 extra_meta: dict | None = None, batch_docs: int = 512) -> dict:
    """Tokenize (id, text) documents, append EOS to each, split train/val by id hash, write `out_dir` atomically."""
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    eos = eos_id(tokenizer)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    writers = {s: _SplitWriter(tmp, s, dtype) for s in ("train", "val")}
    n_docs, start, batch = 0, time.time(), []

    def flush_batch():
        for (doc_id, _), enc in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
            writers["val" if is_validation(doc_id, val_fraction) else "train"].add(enc.ids + [eos])
        batch.clear()

    for doc in documents:
        batch.append(doc)
        n_docs += 1
        if len(batch) == batch_docs:
            flush_batch()
            if n_docs % (batch_docs * 64) == 0:
                log.info("tokenized %d documents (%.0f docs/s)", n_docs, n_docs / (time.time() - start))
    flush_batch()
    splits = {s: w.close() for s, w in writers.items()}
    for s, files in splits.items():
        if not files:
            shutil.rmtree(tmp)
            raise ValueError(f"the {s} split is empty ({n_docs} documents, val_fraction={val_fraction}); "
                             "give more documents or change the validation fraction")
    meta = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": eos, "documents": n_docs, "splits": splits,
            **(extra_meta or {})}
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2)
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
