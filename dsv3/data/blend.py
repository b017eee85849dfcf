"""Weighted blends of corpora, addressed by global sample index.

Corpus c gets the share w_c / sum(w) of the samples. Within each period of 2^16 global indices the
corpora take their slots in a fixed interleaved pattern (stride scheduling: corpus c's j-th slot falls
near (j + 1/2) / share_c), so after any number of samples a corpus' count is within a few samples of
its share (exactly its share, rounded to 2^-16, after each period), and the (corpus, index within the
corpus) of a global index is a closed formula: stateless, like the sampler of a single corpus. Resuming, or splitting the global batch differently over ranks, draws the
same samples; each corpus then visits its own samples in a fresh permutation per epoch.
"""
import logging

import numpy as np
import torch

from dsv3.data.dataset import Batch, GlobalSampler, PackedDataset

log = logging.getLogger("dsv3")
PERIOD = 1 << 16


def blend_counts(weights: list[float]) -> np.ndarray:
    """Slots per period of each corpus: the largest-remainder rounding of the shares of PERIOD."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights {list(weights)}: must be numbers >= 0 with a positive sum")
    ideal = w / w.sum() * PERIOD
    counts = np.floor(ideal).astype(np.int64)
    counts[np.argsort(-(ideal - counts), kind="stable")[:PERIOD - counts.sum()]] += 1
    too_small = [i for i in range(len(w)) if w[i] > 0 and counts[i] == 0]
    if too_small:
        raise ValueError(f"blend weight {weights[too_small[0]]} (entry {too_small[0]}) is below 1/{PERIOD} of the "
                         "total: it would never be sampled")
    return counts


class BlendSchedule:
    """Global sample index -> (corpus, index of the sample among that corpus' draws)."""

    def __init__(self, weights: list[float]):
        self.counts = blend_counts(weights)
        # Corpus c's j-th slot of a period ideally falls at (j + 1/2) / share_c: slots sorted by that time
        # interleave the corpora evenly (stride scheduling).
        corpus = np.repeat(np.arange(len(self.counts)), self.counts)
        j = np.concatenate([np.arange(n) for n in self.counts])
        order = np.lexsort((corpus, (j + 0.5) / self.counts[corpus]))
        self.pattern, self.rank = corpus[order].astype(np.int32), j[order].astype(np.int64)

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(g, dtype=np.int64)
        period, slot = g // PERIOD, g % PERIOD
        corpus = self.pattern[slot]
        return corpus, period * self.counts[corpus] + self.rank[slot]

    def drawn(self, n: int) -> np.ndarray:
        """Samples of each corpus among the global indices [0, n)."""
        tail = np.bincount(self.pattern[:n % PERIOD], minlength=len(self.counts))
        return (n // PERIOD) * self.counts + tail


class Blend:
    """Samples of several corpora (one split each) in the proportions of their weights. `shuffle`: each
    corpus draws its samples in a permutation per epoch (training); else in order (evaluation)."""

    def __init__(self, corpora: list[PackedDataset], weights: list[float], names: list[str], seed: int,
                 shuffle: bool):
        self.corpora, self.names = corpora, names
        self.schedule = BlendSchedule(weights)
        self.samplers = [GlobalSampler(len(d), seed, stream=c) if shuffle else None for c, d in enumerate(corpora)]

    def __len__(self) -> int:
        return sum(len(d) for d in self.corpora)

    def batch(self, indices) -> Batch:
        corpus, k = self.schedule.locate(np.asarray(list(indices), dtype=np.int64))
        rows = []
        for c, i in zip(corpus.tolist(), k.tolist()):
            sampler = self.samplers[c]
            index = sampler(i, 1)[0] if sampler is not None else i % len(self.corpora[c])
            rows.append(self.corpora[c].batch([index]))
        documents = None if rows[0].documents is None else torch.cat([r.documents for r in rows])
        return Batch(torch.cat([r.tokens for r in rows]), documents)

    def describe(self) -> str:
        shares = self.schedule.counts / PERIOD
        return ", ".join(f"{n} {s:.1%} of samples ({len(d)} samples per epoch)"
                         for n, s, d in zip(self.names, shares, self.corpora))

    def epochs(self, consumed: int) -> np.ndarray:
        """Passes over each corpus that the first `consumed` global samples make (1.5: half-way through its second)."""
        return self.schedule.drawn(consumed) / np.array([len(d) for d in self.corpora])

    def report(self, before: int, after: int, step: int) -> dict:
        """Metrics after the global samples [before, after): each corpus' epochs and realized share so far.
        Logs a corpus that starts another pass over its samples (a small corpus repeating)."""
        sizes = np.array([len(d) for d in self.corpora])
        last_before = (self.schedule.drawn(before) - 1) // sizes  # epoch of each corpus' latest draw (-1: none)
        drawn = self.schedule.drawn(after)
        for c in np.flatnonzero(((drawn - 1) // sizes > last_before) & ((drawn - 1) // sizes >= 1)):
            log.info("data: %s starts epoch %d (pass %d over its %d samples) at step %d", self.names[c],
                     (drawn[c] - 1) // sizes[c], (drawn[c] - 1) // sizes[c] + 1, sizes[c], step)
        metrics = {f"data/epoch/{name}": float(drawn[c] / sizes[c]) for c, name in enumerate(self.names)}
        if len(self.names) > 1:
            metrics.update({f"data/share/{name}": float(drawn[c] / max(after, 1)) for c, name in enumerate(self.names)})
        return metrics
