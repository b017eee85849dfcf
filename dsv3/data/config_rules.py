"""Config rules of the data (`data.*`), registered in dsv3/config/rules.py: where the tokens come from (one
corpus or a blend), that the model's vocabulary holds every token id they contain, and what FIM and
document masks need of the shards."""
import os
from typing import Any

from dsv3.config.errors import ConfigError
from dsv3.config.rules import World, one_of, require
from dsv3.config.schema import Config
from dsv3.data.shards import read_meta
from dsv3.data.tokenizer import ensure_fim_tokens, eos_id, load_tokenizer, min_bpe_vocab

SOURCES = ("stdlib", "shards")


def _shard_meta(key: str, path: Any) -> dict:
    require(path is not None and os.path.isfile(os.path.join(str(path), "meta.json")), key, path,
            "must be a directory written by launch/prepare_data.py (with meta.json)")
    return read_meta(str(path))


def _corpora(cfg: Config) -> dict[str, dict]:
    """The meta.json of each prepared corpus the run reads, by the key that names it (none: stdlib).
    Blend entries are checked to share one tokenizer."""
    d = cfg.data
    metas = {}
    if d.blend:
        require(d.source == "shards" and d.path is None, "data.blend", [b.path for b in d.blend],
                "replaces data.path: use it with data.source=shards and data.path=null")
        from dsv3.data.blend import blend_counts

        try:
            blend_counts([b.weight for b in d.blend])
        except ValueError as e:
            raise ConfigError("data.blend", [b.weight for b in d.blend], str(e)) from None
        for i, b in enumerate(d.blend):
            metas[f"data.blend[{i}].path"] = _shard_meta(f"data.blend[{i}].path", b.path)
        digests = {key: meta.get("tokenizer_sha256") for key, meta in metas.items()}
        first = next(iter(digests))
        for key, digest in digests.items():
            require(digest is not None and digest == digests[first], key, d.blend[list(digests).index(key)].path,
                    f"must be tokenized like data.blend[0].path ({d.blend[0].path}): the tokenizers differ (or "
                    "one was prepared by an older version that did not record it)")
    elif d.source == "shards":
        metas["data.path"] = _shard_meta("data.path", d.path)
    return metas


def data_rules(cfg: Config, world: World) -> None:
    d, m = cfg.data, cfg.model
    one_of("data.source", d.source, SOURCES)
    require(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    require(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
            f"must be <= model.max_seq_len ({m.max_seq_len}), the length RoPE/YaRN is built for")
    require(0 < d.val_fraction < 0.5, "data.val_fraction", d.val_fraction, "must be in (0, 0.5)")
    require(0 <= d.fim_rate <= 1, "data.fim_rate", d.fim_rate, "must be in [0, 1] (V3: 0.1)")
    metas = _corpora(cfg)
    paths = {"data.path": d.path, **{f"data.blend[{i}].path": b.path for i, b in enumerate(d.blend)}}
    for key, meta in metas.items():
        where = paths[key]
        require(meta["vocab_size"] <= m.vocab_size, "model.vocab_size", m.vocab_size,
                f"must be >= the {meta['vocab_size']} tokens of the tokenizer of {where}: every token id needs "
                "an embedding row")
        for split, files in meta.get("splits", {}).items():
            tokens = sum(f["tokens"] for f in files)
            require(tokens > d.seq_len, "data.seq_len", d.seq_len,
                    f"must be < the {tokens} tokens of the {split} split of {where} (a sample is seq_len + 1 tokens)")
    if d.tokenizer is not None:
        require(os.path.isfile(d.tokenizer), "data.tokenizer", d.tokenizer, "must be an existing tokenizer.json")
    if d.source == "stdlib":
        if d.tokenizer is None:  # a BPE of exactly model.vocab_size tokens is trained on the embedded corpus
            require(m.vocab_size >= min_bpe_vocab(), "model.vocab_size", m.vocab_size,
                    f"must be >= {min_bpe_vocab()} to train the embedded corpus' byte-level BPE (256 bytes, a merge "
                    "and the special tokens)")
        else:
            tok = load_tokenizer(d.tokenizer)
            try:
                eos_id(tok)  # every document is followed by an end-of-text token
            except ValueError as e:
                raise ConfigError("data.tokenizer", d.tokenizer, str(e)) from None
            ensure_fim_tokens(tok)  # as the embedded corpus' preparation does
            require(tok.get_vocab_size() <= m.vocab_size, "model.vocab_size", m.vocab_size,
                    f"must be >= the {tok.get_vocab_size()} tokens of data.tokenizer={d.tokenizer} (with the FIM "
                    "sentinels): every token id needs an embedding row")
    if d.fim_rate > 0 or d.document_masks:
        key = "data.fim_rate" if d.fim_rate > 0 else "data.document_masks"
        for where, meta in metas.items():
            require(meta.get("format", 1) >= 2, key, getattr(d, key.split(".")[1]),
                    f"needs the document index of shards prepared by this version; {where} has none: prepare it again")
            require(d.fim_rate == 0 or meta.get("fim_ids") is not None, "data.fim_rate", d.fim_rate,
                    f"the tokenizer of {where} has no FIM sentinels: prepare it again (launch/prepare_data.py "
                    "adds <|fim_begin|>, <|fim_hole|>, <|fim_end|>)")
    require(not d.document_masks or cfg.parallel.pp == 1, "data.document_masks", d.document_masks,
            "is not supported with pipeline parallelism (parallel.pp > 1) yet")


RULES = (data_rules,)
