"""Packed fixed-length samples over token shards, and the deterministic, resumable order they are drawn in.

The documents of a split (each ending with EOS, some rearranged for Fill-in-Middle) form one token
stream, cut into samples of `seq_len + 1` tokens: the inputs and, shifted by one, the labels. Sample i
is the stream's tokens [i * seq_len, i * seq_len + seq_len + 1), whichever shard files they lie in, so
samples depend on the documents and their order only, never on how files were cut.
"""
import bisect
import functools
from typing import NamedTuple

import numpy as np
import torch

from dsv3.data.fim import Fim
from dsv3.data.shards import open_index, open_split

BLOCK = 4096  # documents whose FIM choices are recomputed together when locating a position


class Batch(NamedTuple):
    tokens: torch.Tensor
    """[B, seq_len + 1] int64."""
    documents: torch.Tensor | None
    """[B, seq_len + 1] int64: equal within one document (for attention masks), when asked for."""


def _slice_pieces(raw: np.ndarray, pieces: list, lo: int, hi: int) -> list[np.ndarray]:
    """Positions [lo, hi) of a document made of pieces (ranges of `raw`, or single token ids)."""
    out, at = [], 0
    for p in pieces:
        n = 1 if isinstance(p, int) else p[1] - p[0]
        a, b = max(lo, at), min(hi, at + n)
        if a < b:
            out.append(np.asarray([p] if isinstance(p, int) else raw[p[0] + a - at:p[0] + b - at], dtype=np.int64))
        at += n
    return out


class DocumentStream:
    """The token stream of one split. `fim` rearranges documents; `documents=True` also returns, for every
    token, which document it belongs to. Either needs the shards' document index (format 2).

    With FIM a document's position in the stream moves by 3 tokens per rearranged document before it;
    those counts are kept per block of BLOCK documents (memory: 8 bytes per block), and recomputed
    inside a block from the hash when a sample needs them."""

    def __init__(self, directory: str, split: str, fim: Fim | None = None, documents: bool = False):
        self.tokens = open_split(directory, split)
        self.fim = fim if fim is not None and fim.rate > 0 else None
        self.ends = open_index(directory, split) if (self.fim or documents) else None
        self.first_doc = np.concatenate([[0], np.cumsum([len(e) for e in self.ends])]).tolist() if self.ends else None
        self.block_start, lengths = [], []
        for s, t in enumerate(self.tokens):
            if self.fim is None:
                lengths.append(len(t))
                continue
            n_docs = len(self.ends[s])
            chosen = self.fim.chosen(np.arange(self.first_doc[s], self.first_doc[s] + n_docs))
            per_block = np.add.reduceat(chosen.astype(np.int64), np.arange(0, n_docs, BLOCK)) if n_docs else []
            fim_before = np.concatenate([[0], np.cumsum(per_block)])  # rearranged docs before each block
            raw_before = np.concatenate([[0], self.ends[s][BLOCK - 1:n_docs - 1:BLOCK]])
            raw_before = np.concatenate([raw_before, [len(t)]])[:len(fim_before)]
            self.block_start.append((raw_before + 3 * fim_before).astype(np.int64))  # transformed block starts; last = length
            lengths.append(int(self.block_start[-1][-1]))
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    @functools.lru_cache(maxsize=64)
    def _block(self, shard: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Transformed end offsets, raw start offsets and FIM choices of the documents of one block."""
        ends = self.ends[shard]
        lo, hi = block * BLOCK, min((block + 1) * BLOCK, len(ends))
        raw_ends = np.asarray(ends[lo:hi], dtype=np.int64)
        raw_starts = np.concatenate([[ends[lo - 1] if lo else 0], raw_ends[:-1]])
        chosen = self.fim.chosen(np.arange(self.first_doc[shard] + lo, self.first_doc[shard] + hi))
        t_ends = self.block_start[shard][block] + np.cumsum(raw_ends - raw_starts + 3 * chosen)
        return t_ends, raw_starts, chosen

    def _fim_piece(self, shard: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document numbers of the rearranged stream of one shard, positions [a, b)."""
        tokens, raw = [], self.tokens[shard]
        docs = []
        block = int(np.searchsorted(self.block_start[shard], a, side="right")) - 1
        t_ends, raw_starts, chosen = self._block(shard, block)
        d = int(np.searchsorted(t_ends, a, side="right"))
        pos = a
        while pos < b:
            if d == len(t_ends):
                block, d = block + 1, 0
                t_ends, raw_starts, chosen = self._block(shard, block)
            t_end = int(t_ends[d])
            t_start = t_end - (int(self.ends[shard][block * BLOCK + d]) - int(raw_starts[d])) - 3 * int(chosen[d])
            doc_index = self.first_doc[shard] + block * BLOCK + d
            lo, hi = pos - t_start, min(b, t_end) - t_start
            start, length = int(raw_starts[d]), int(self.ends[shard][block * BLOCK + d]) - int(raw_starts[d])
            if chosen[d]:
                tokens += _slice_pieces(raw, self.fim.pieces(doc_index, start, length), lo, hi)
            else:
                tokens.append(np.asarray(raw[start + lo:start + hi], dtype=np.int64))
            docs.append(np.full(hi - lo, doc_index, dtype=np.int64))
            pos, d = t_start + hi, d + 1
        return np.concatenate(tokens), np.concatenate(docs)

    def window(self, start: int, length: int, documents: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [start, start + length) of the stream (int64), and their document numbers if asked."""
        tokens, docs = [], []
        shard = bisect.bisect_right(self.starts, start) - 1
        pos, stop = start, start + length
        while pos < stop:
            a, b = pos - self.starts[shard], min(stop, self.starts[shard + 1]) - self.starts[shard]
            if self.fim is not None:
                t, d = self._fim_piece(shard, a, b)
                tokens.append(t)
                docs.append(d)
            else:
                tokens.append(np.asarray(self.tokens[shard][a:b], dtype=np.int64))
                if documents:
                    doc = np.searchsorted(self.ends[shard], np.arange(a, b), side="right")
                    docs.append(self.first_doc[shard] + doc)
            pos, shard = self.starts[shard] + b, shard + 1
        tokens = tokens[0] if len(tokens) == 1 else np.concatenate(tokens)
        if not documents:
            return tokens, None
        docs = np.concatenate(docs)
        return tokens, docs - docs[0]


class PackedDataset:
    def __init__(self, directory: str, split: str, seq_len: int, fim: Fim | None = None, documents: bool = False):
        self.directory, self.seq_len, self.documents = directory, seq_len, documents
        self.stream = DocumentStream(directory, split, fim, documents)
        self.n = max(0, (len(self.stream) - 1) // seq_len)
        if self.n == 0:
            raise ValueError(f"{directory} ({split}): fewer than {seq_len + 1} tokens, not one sample of "
                             f"data.seq_len={seq_len}")

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> np.ndarray:
        return self.stream.window(i * self.seq_len, self.seq_len + 1)[0]

    def batch(self, indices: list[int]) -> Batch:
        windows = [self.stream.window(i * self.seq_len, self.seq_len + 1, self.documents) for i in indices]
        tokens = torch.from_numpy(np.stack([t for t, _ in windows]))
        docs = torch.from_numpy(np.stack([d for _, d in windows])) if self.documents else None
        return Batch(tokens, docs)


class GlobalSampler:
    """Global sample index g -> dataset index: epoch g // N visits a permutation seeded by (seed, epoch).

    Stateless: the position of a run is just the number of samples consumed, so resuming, or changing
    how the global batch is split over ranks, draws exactly the same samples. `stream` separates the
    corpora of a blend (stream 0 draws what a single corpus always drew)."""

    def __init__(self, n_samples: int, seed: int, stream: int = 0):
        self.n, self.seed, self.stream = n_samples, seed, stream
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.stream * 2**40)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __call__(self, start: int, count: int) -> list[int]:
        return [int(self._permutation(g // self.n)[g % self.n]) for g in range(start, start + count)]
