"""Data: corpora, tokenizer, token shards, packed samples and the resumable sampler."""
from dsv3.config.schema import DataConfig
from dsv3.data.dataset import GlobalSampler, PackedDataset
from dsv3.data.embedded import stdlib_shards
from dsv3.data.shards import read_meta


def shard_directory(cfg: DataConfig, vocab_size: int) -> str:
    """Where the run's shards are: prepared by the user, or the embedded corpus (built on first use)."""
    directory = stdlib_shards(cfg, vocab_size) if cfg.source == "stdlib" else cfg.path
    # dsv3/data/config_rules.py refuses a vocabulary larger than the model's before any work
    assert read_meta(directory)["vocab_size"] <= vocab_size, (directory, vocab_size)
    return directory


__all__ = ["GlobalSampler", "PackedDataset", "read_meta", "shard_directory"]
