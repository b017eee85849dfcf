"""Packed fixed-length samples over token shards, and the deterministic, resumable order they are drawn in.

Documents are concatenated (each followed by EOS) and cut into samples of `seq_len + 1` tokens: the
inputs and, shifted by one, the labels. A sample never straddles two shard files.
"""
import bisect

import numpy as np
import torch

from dsv3.data.shards import open_split


class PackedDataset:
    def __init__(self, directory: str, split: str, seq_len: int):
        self.seq_len = seq_len
        self.shards = open_split(directory, split)
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        if self.starts[-1] == 0:
            raise ValueError(f"{directory} ({split}): fewer than {seq_len + 1} tokens, not one sample of "
                             f"data.seq_len={seq_len}")

    def __len__(self) -> int:
        return self.starts[-1]

    def sample(self, i: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, i) - 1
        offset = (i - self.starts[shard]) * self.seq_len
        return self.shards[shard][offset:offset + self.seq_len + 1]

    def batch(self, indices: list[int]) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64."""
        return torch.from_numpy(np.stack([self.sample(i).astype(np.int64) for i in indices]))


class GlobalSampler:
    """Global sample index g -> dataset index: epoch g // N visits a permutation seeded by (seed, epoch).

    Stateless: the position of a run is just the number of samples consumed, so resuming, or changing
    how the global batch is split over ranks, draws exactly the same samples."""

    def __init__(self, n_samples: int, seed: int):
        self.n, self.seed = n_samples, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __call__(self, start: int, count: int) -> list[int]:
        return [int(self._permutation(g // self.n)[g % self.n]) for g in range(start, start + count)]
