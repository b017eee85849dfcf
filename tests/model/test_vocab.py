"""Special tokens added to a trained tokenizer, and the embedding/head grown to match, without breaking
what the checkpoint already knows."""
import dataclasses

import pytest
import torch

from dsv3.config import ConfigError
from dsv3.config.rules import World
from dsv3.config.schema import Config, ModelConfig
from dsv3.data.tokenizer import EOS, add_special_tokens, train_bpe
from dsv3.model import Transformer, init_weights
from dsv3.model.hf_format import save_hf
from dsv3.model.vocab import grow_vocab
from dsv3.train.checkpoint import save_checkpoint
from dsv3.train.config_rules import checkpoint_rules
from dsv3.train.weights import load_initial_weights

TEXT = ["def f(x):\n    return x + 1\n", "the answer is 42 <think> not special yet", "print('hello')"] * 30
NAMES = ["<think>", "</think>", "<answer>", "</answer>"]


def test_special_tokens_get_new_ids_and_old_encodings_do_not_change():
    tok = train_bpe(TEXT, 300)
    before_size = tok.get_vocab_size()
    plain = "def g(y):\n    return y * 2  # 42"
    before = tok.encode(plain).ids
    assert add_special_tokens(tok, NAMES) == NAMES
    ids = [tok.token_to_id(n) for n in NAMES]
    assert ids == list(range(before_size, before_size + 4))
    assert tok.get_vocab_size() == before_size + 4
    assert tok.encode(plain).ids == before
    enc = tok.encode("<think>x+1</think><answer>42</answer>").ids
    assert [i for i in enc if i >= before_size] == ids  # each tag one token, never split
    assert tok.decode(enc, skip_special_tokens=False) == "<think>x+1</think><answer>42</answer>"
    assert add_special_tokens(tok, NAMES + ["<|tool|>"]) == ["<|tool|>"]  # present ones are kept
    assert tok.token_to_id("<|tool|>") == before_size + 4
    eos = tok.token_to_id(EOS)
    assert add_special_tokens(tok, [EOS]) == [] and tok.token_to_id(EOS) == eos < before_size
    with pytest.raises(ValueError, match="distinct"):
        add_special_tokens(tok, ["<a>", "<a>"])


def small_model(vocab: int) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_heads=2,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32)
    model = Transformer(cfg).eval()
    init_weights(model, seed=0, std=0.05)
    return model


def test_grown_model_keeps_every_old_logit():
    model = small_model(100)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        grow_vocab(model, 104)
        after = model(tokens)
    assert model.cfg.vocab_size == 104 and after.shape[-1] == 104
    assert torch.equal(after[..., :100], before)
    torch.testing.assert_close(model.head.weight[100:], model.head.weight[:100].mean(0).expand(4, -1))
    torch.testing.assert_close(model.embed.weight[103], model.embed.weight[:100].mean(0))
    with pytest.raises(ValueError, match="shrink"):
        grow_vocab(model, 50)


@pytest.mark.parametrize("source", ["dsv3", "hf"])
def test_initial_weights_with_a_smaller_vocabulary_are_grown(source, tmp_path):
    old = small_model(100)
    if source == "dsv3":
        opt = torch.optim.SGD(old.parameters(), lr=0.1)
        path = save_checkpoint(str(tmp_path), 1, old, opt, {"step": 1},
                               "model:\n" + "".join(f"  {k}: {v}\n" for k, v in dataclasses.asdict(old.cfg).items()))
    else:
        path = str(tmp_path / "hf")
        save_hf(path, old.cfg, old.state_dict())
    new_cfg = dataclasses.replace(old.cfg, vocab_size=104)
    new = Transformer(new_cfg).eval()
    load_initial_weights(path, new, new_cfg)
    tokens = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(new(tokens)[..., :100], old(tokens), rtol=0, atol=0)
    # weights with a larger vocabulary cannot be shrunk into the model: a config error, before any work
    cfg = Config(model=small_model(90).cfg)
    cfg.checkpoint.init_from = path
    with pytest.raises(ConfigError, match="another architecture: model.vocab_size 90 vs 100"):
        checkpoint_rules(cfg, World())
