"""Greedy generation of our model equals `transformers`' `generate` on the exported checkpoint, token for
token: HF's own DeepseekV3 implementation and KV cache are the independent reference."""
import pytest
import torch

from dsv3.generate import Generator, SamplingParams
from dsv3.model.hf_format import save_hf
from gen_cases import prompts, tiny_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("case", ["q_compression_yarn", "no_q_compression"])
def test_greedy_equals_transformers_generate_on_the_export(case, tmp_path):
    model = tiny_model(case, std=0.1)
    save_hf(str(tmp_path), model.cfg, model.state_dict())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ps = prompts(model.cfg.vocab_size, lengths=(7, 3, 11))
    n = 24
    ours = Generator(model).generate(ps, SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=()))
    P = max(map(len, ps))
    ids = torch.zeros(len(ps), P, dtype=torch.long)
    mask = torch.zeros(len(ps), P, dtype=torch.long)
    for i, p in enumerate(ps):  # HF batches decoder-only prompts with left padding
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = theirs.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    for i, c in enumerate(ours.completions):
        assert c.tokens == out[i, P:].tolist(), f"prompt {i}"
