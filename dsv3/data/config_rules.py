"""Config rules of the data (`data.*`), registered in dsv3/config/rules.py: where the tokens come from,
and that the model's vocabulary holds every token id they contain."""
import os

from dsv3.config.errors import ConfigError
from dsv3.config.rules import one_of, require
from dsv3.config.schema import Config
from dsv3.data.shards import read_meta
from dsv3.data.tokenizer import MIN_BPE_VOCAB, eos_id, load_tokenizer

SOURCES = ("stdlib", "shards")


def data_rules(cfg: Config, world_size: int) -> None:
    d, m = cfg.data, cfg.model
    one_of("data.source", d.source, SOURCES)
    require(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    require(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
            f"must be <= model.max_seq_len ({m.max_seq_len}), the length RoPE/YaRN is built for")
    require(0 < d.val_fraction < 0.5, "data.val_fraction", d.val_fraction, "must be in (0, 0.5)")
    if d.source == "shards":
        require(d.path is not None and os.path.isfile(os.path.join(str(d.path), "meta.json")), "data.path", d.path,
                "must be a directory written by launch/prepare_data.py (with meta.json)")
        meta = read_meta(d.path)
        vocab, where = meta["vocab_size"], f"the tokenizer of {d.path}"
        for split, files in meta.get("splits", {}).items():
            tokens = sum(f["tokens"] for f in files)
            require(tokens > d.seq_len, "data.seq_len", d.seq_len,
                    f"must be < the {tokens} tokens of the {split} split of {d.path} (a sample is seq_len + 1 tokens)")
    elif d.tokenizer is not None:
        require(os.path.isfile(d.tokenizer), "data.tokenizer", d.tokenizer, "must be an existing tokenizer.json")
        tok = load_tokenizer(d.tokenizer)
        try:
            eos_id(tok)
        except ValueError as e:  # every document is followed by an end-of-text token
            raise ConfigError("data.tokenizer", d.tokenizer, str(e)) from None
        vocab, where = tok.get_vocab_size(), f"data.tokenizer={d.tokenizer}"
    else:  # a BPE of exactly model.vocab_size tokens is trained on the embedded corpus
        require(m.vocab_size >= MIN_BPE_VOCAB, "model.vocab_size", m.vocab_size,
                f"must be >= {MIN_BPE_VOCAB} to train the embedded corpus' byte-level BPE (256 bytes, merges, EOS)")
        return
    require(vocab <= m.vocab_size, "model.vocab_size", m.vocab_size,
            f"must be >= the {vocab} tokens of {where}: every token id needs an embedding row")


RULES = (data_rules,)
