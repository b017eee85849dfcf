"""Byte-level BPE tokenizer, trained locally with `tokenizers` (no download) or loaded from a tokenizer.json."""
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


MIN_BPE_VOCAB = 258  # 256 byte symbols, at least one merge, and the EOS token


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (256 byte symbols + merges + the EOS token)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {MIN_BPE_VOCAB} entries")
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
