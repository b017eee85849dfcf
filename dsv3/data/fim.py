"""Fill-in-Middle at document level (DeepSeek-V3 report §4.1, the recipe of DeepSeek-Coder-V2).

A share `rate` of the documents is rearranged, before packing, into Prefix-Suffix-Middle order:

    <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <EOS>

so the model learns to fill a hole from the text on both sides while next-token prediction is
unchanged on the others. Which documents, and where each is cut (two points, uniform over its token
positions), follow from a counter-based hash of (seed, stream, document index): the same document gets
the same transform in every epoch, on every rank, after every resume, without any state. The cut
points are token boundaries: the shards hold tokens, and rearranging them (instead of re-tokenizing
the text, as DeepSeek-Coder does at character level) keeps every sample addressable by index.
A transformed document is 3 tokens longer than the original.
"""
from dataclasses import dataclass

import numpy as np

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def uniform(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per index: splitmix64 of (seed, stream, index)."""
    with np.errstate(over="ignore"):
        x = np.asarray(index, dtype=np.uint64) * _GOLDEN
        x ^= np.uint64((seed * 0x632BE59BD9B4E019 + stream * 0x85EBCA77C2B2AE63) & 0xFFFFFFFFFFFFFFFF)
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class Fim:
    rate: float
    seed: int
    stream: int
    """Separates corpora of a blend: the same document index draws differently in each."""
    begin: int
    hole: int
    end: int

    def chosen(self, docs: np.ndarray) -> np.ndarray:
        """Which of the documents (by index in their split) are rearranged."""
        return uniform(self.seed, 3 * self.stream, docs) < self.rate

    def cuts(self, doc: int, body: int) -> tuple[int, int]:
        """prefix = body[:i], middle = body[i:j], suffix = body[j:], for a body of `body` tokens (EOS excluded)."""
        u = np.concatenate([uniform(self.seed, 3 * self.stream + k, [doc]) for k in (1, 2)])
        i, j = sorted(int(x) for x in np.minimum(u * (body + 1), body))
        return i, j

    def pieces(self, doc: int, start: int, length: int) -> list[tuple[int, int] | int]:
        """The rearranged document as pieces: (begin, end) ranges of the original's positions, or sentinel ids.
        The original occupies [start, start + length) and ends with EOS."""
        body = length - 1
        i, j = self.cuts(doc, body)
        a = start
        return [self.begin, (a, a + i), self.hole, (a + j, a + body), self.end, (a + i, a + j), (a + body, a + length)]


def transform(tokens: np.ndarray, fim: Fim, doc: int) -> np.ndarray:
    """One whole document (ending with EOS), rearranged."""
    return np.concatenate([np.asarray([p]) if isinstance(p, int) else tokens[p[0]:p[1]]
                           for p in fim.pieces(doc, 0, len(tokens))]).astype(tokens.dtype)


def untransform(tokens: np.ndarray, begin: int, hole: int, end: int) -> np.ndarray:
    """The original of a rearranged document: prefix + middle + suffix + EOS."""
    t = list(tokens)
    if t[0] != begin:
        raise ValueError("not a FIM document: it does not start with the begin sentinel")
    h, e = t.index(hole), t.index(end)
    return np.asarray(t[1:h] + t[e + 1:-1] + t[h + 1:e] + t[-1:], dtype=tokens.dtype)
