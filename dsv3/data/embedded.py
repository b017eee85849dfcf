"""The embedded default corpus, tokenized once per machine and cached.

The cache key is (corpus fingerprint, vocabulary size, tokenizer, validation fraction). Concurrent
processes (all ranks of a node) serialize on a file lock; the first builds, the others find it ready.
"""
import fcntl
import hashlib
import logging
import os
import time

from dsv3.config.schema import DataConfig
from dsv3.data.corpus import fingerprint, stdlib_documents
from dsv3.data.shards import META, write_shards
from dsv3.data.tokenizer import ensure_fim_tokens, load_tokenizer, train_bpe

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    # an empty XDG_CACHE_HOME counts as unset (XDG spec), not as "the current directory"
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsv3")


def stdlib_shards(cfg: DataConfig, vocab_size: int) -> str:
    """Directory of the embedded corpus' shards for this config, building them if needed."""
    docs = stdlib_documents()
    tok_key = "bpe" if cfg.tokenizer is None else hashlib.sha1(open(cfg.tokenizer, "rb").read()).hexdigest()[:12]
    # f2: shards with a document index and FIM sentinels in the tokenizer
    key = f"{fingerprint(docs)[:16]}-v{vocab_size}-{tok_key}-val{cfg.val_fraction}-f2"
    cache = cfg.cache_dir or default_cache_dir()
    out = os.path.join(cache, f"stdlib-{key}")
    if os.path.isfile(os.path.join(out, META)):
        return out
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, f"stdlib-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, META)):
            start = time.time()
            if cfg.tokenizer is None:
                log.info("training a %d-token byte-level BPE on %d standard-library modules", vocab_size, len(docs))
                tok = train_bpe((text for _, text in docs), vocab_size)
            else:
                tok = load_tokenizer(cfg.tokenizer)
                ensure_fim_tokens(tok)
            meta = write_shards(out, docs, tok, cfg.val_fraction, extra_meta={"source": "python-stdlib"})
            log.info("embedded corpus ready in %.0fs: %d train / %d val tokens in %s", time.time() - start,
                     sum(s["tokens"] for s in meta["splits"]["train"]),
                     sum(s["tokens"] for s in meta["splits"]["val"]), out)
    return out
