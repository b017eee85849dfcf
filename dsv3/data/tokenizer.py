"""Byte-level BPE tokenizer, trained locally with `tokenizers` (no download) or loaded from a tokenizer.json."""
import hashlib
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
# Fill-in-Middle sentinels (V3 report §4.1), in Prefix-Suffix-Middle order of use.
FIM_TOKENS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")
# The same three sentinels as other tokenizers spell them: DeepSeek's own, StarCoder's (prefix, suffix, middle).
_FIM_SPELLINGS = (FIM_TOKENS, ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
                  ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))


DEFAULT_SPECIAL_TOKENS = (EOS, *FIM_TOKENS)


def min_bpe_vocab(n_special: int = len(DEFAULT_SPECIAL_TOKENS)) -> int:
    """A byte-level BPE needs its 256 byte symbols, at least one merge, and its special tokens."""
    return 257 + n_special


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (256 byte symbols + merges + the special tokens)."""
    special_tokens = list(special_tokens)
    if vocab_size < min_bpe_vocab(len(special_tokens)):
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE with {len(special_tokens)} special tokens "
                         f"needs at least {min_bpe_vocab(len(special_tokens))} entries")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


def add_special_tokens(tok: Tokenizer, names: Iterable[str]) -> list[str]:
    """Add named special tokens to a (trained) tokenizer, in place; returns the names it lacked and added.

    New tokens get the ids after the current vocabulary, in the order given; a name already present
    keeps its id, so calling it again is harmless. No existing id changes and text without the new
    names encodes as before, so a checkpoint trained with `tok` stays valid once its embedding and
    output head grow to the new size (`dsv3.model.vocab.grow_vocab`; `checkpoint.init_from` grows a
    smaller vocabulary on loading). A special token is never split or merged with its neighbours, and
    decodes to its name (with `skip_special_tokens=False`)."""
    names = list(names)
    if len(set(names)) != len(names) or any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"special token names must be distinct non-empty strings, got {names}")
    missing = [n for n in names if tok.token_to_id(n) is None]
    first = tok.get_vocab_size(with_added_tokens=True)
    if missing:
        tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in missing])
    placed = [tok.token_to_id(n) for n in missing]
    if placed != list(range(first, first + len(missing))):
        raise RuntimeError(f"the tokenizer placed {missing} at {placed}, not after its {first} existing entries")
    return missing


def eos_id(tok: Tokenizer) -> int:
    """The id appended after every document: our EOS, else a common end-of-text token of the user's tokenizer."""
    for name in (EOS, "</s>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>"):
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise ValueError("the tokenizer has no end-of-text token (looked for <|endoftext|>, </s>, <eos>, ...)")


def fim_ids(tok: Tokenizer) -> tuple[int, int, int] | None:
    """Ids of the (begin, hole, end) FIM sentinels under any known spelling, or None."""
    for spelling in _FIM_SPELLINGS:
        ids = [tok.token_to_id(n) for n in spelling]
        if None not in ids:
            return tuple(ids)
    return None


def ensure_fim_tokens(tok: Tokenizer) -> list[str]:
    """Give a tokenizer without FIM sentinels ours, so `data.fim_rate` can be used on its shards."""
    return [] if fim_ids(tok) is not None else add_special_tokens(tok, FIM_TOKENS)


def tokenizer_digest(tok: Tokenizer) -> str:
    """Identifies a tokenizer by content: two shard directories mix only if theirs are equal."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()
