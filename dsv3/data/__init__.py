"""Data: corpora, tokenizer, token shards, packed samples, blends, Fill-in-Middle and the resumable sampler.

Importing the package is light (no torch): `launch/prepare_data.py` and its worker processes need only
the preparation modules. The training-side names below load on first use.
"""
import importlib

_LAZY = {"Batch": "dataset", "GlobalSampler": "dataset", "PackedDataset": "dataset", "Blend": "blend",
         "Fim": "fim", "read_meta": "shards", "build_data": "loading", "shard_directory": "loading"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"dsv3.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dsv3.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
