"""What a run trains on: the corpus or blend of corpora of its `data` config, as training and validation samples."""
import os

from dsv3.config.schema import DataConfig
from dsv3.data.blend import Blend
from dsv3.data.dataset import PackedDataset
from dsv3.data.embedded import stdlib_shards
from dsv3.data.fim import Fim
from dsv3.data.shards import read_meta


def shard_directory(cfg: DataConfig, vocab_size: int, path: str | None = None) -> str:
    """Where a corpus' shards are: prepared by the user (`path`, default data.path), or the embedded corpus
    (built on first use)."""
    directory = stdlib_shards(cfg, vocab_size) if cfg.source == "stdlib" else (path or cfg.path)
    # dsv3/data/config_rules.py refuses a vocabulary larger than the model's before any work
    assert read_meta(directory)["vocab_size"] <= vocab_size, (directory, vocab_size)
    return directory


def build_data(cfg: DataConfig, vocab_size: int, seed: int) -> tuple[Blend, Blend]:
    """The training and validation samples: one corpus, or `data.blend`'s corpora mixed by weight.
    Fill-in-Middle (`data.fim_rate`) rearranges training documents only: the held-out loss stays the
    plain next-token loss, comparable whatever the rate."""
    if cfg.blend:
        entries = [(b.name or os.path.basename(os.path.normpath(b.path)), b.path, b.weight) for b in cfg.blend]
    else:
        entries = [("stdlib" if cfg.source == "stdlib" else os.path.basename(os.path.normpath(cfg.path)), None, 1.0)]
    names = [n if [e[0] for e in entries].count(n) == 1 else f"{n}_{c}" for c, (n, _, _) in enumerate(entries)]
    train, val = [], []
    for c, (_, path, _) in enumerate(entries):
        directory = shard_directory(cfg, vocab_size, path)
        fim = None
        if cfg.fim_rate > 0:
            ids = read_meta(directory).get("fim_ids")
            assert ids, directory  # shards without FIM sentinels are refused by dsv3/data/config_rules.py
            fim = Fim(cfg.fim_rate, seed, c, *ids)
        train.append(PackedDataset(directory, "train", cfg.seq_len, fim, cfg.document_masks))
        val.append(PackedDataset(directory, "val", cfg.seq_len, None, cfg.document_masks))
    weights = [w for _, _, w in entries]
    return (Blend(train, weights, names, seed, shuffle=True), Blend(val, weights, names, seed, shuffle=False))

