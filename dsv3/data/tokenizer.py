"""Byte-level BPE tokenizer, trained locally with `tokenizers` (no download) or loaded from a tokenizer.json."""
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (256 byte symbols + merges + the EOS token)."""
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 258 entries")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


def eos_id(tok: Tokenizer) -> int:
    """The id appended after every document: our EOS, else a common end-of-text token of the user's tokenizer."""
    for name in (EOS, "</s>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>"):
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise ValueError("the tokenizer has no end-of-text token (looked for <|endoftext|>, </s>, <eos>, ...)")


def add_special_tokens(tok: Tokenizer, names: Sequence[str]) -> dict[str, int]:
    """Add named special tokens to a (trained) tokenizer, in place; returns name -> id for all of them.

    New tokens get the ids after the current vocabulary, in the order given; a name already present
    keeps its id, so calling it again is harmless. No existing id changes and text without the new
    names encodes as before, so a checkpoint trained with `tok` stays valid once its embedding and
    output head grow to the new size (`dsv3.model.vocab.grow_vocab`). A special token is never split
    or merged with its neighbours, and decodes to its name (with `skip_special_tokens=False`)."""
    if len(set(names)) != len(names) or any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"special token names must be distinct non-empty strings, got {list(names)}")
    new = [n for n in names if tok.token_to_id(n) is None]
    first = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in new])
    ids = {n: tok.token_to_id(n) for n in names}
    if [ids[n] for n in new] != list(range(first, first + len(new))):
        raise RuntimeError(f"the tokenizer placed {new} at {[ids[n] for n in new]}, not after its "
                           f"{first} existing entries")
    return ids
