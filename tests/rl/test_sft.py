"""Cold-start SFT: the completion-only loss against a hand-computed masked cross-entropy, the label
mask, packing, plan independence of the step loss, and the launcher end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dsv3.data.tokenizer import add_special_tokens, load_tokenizer, train_bpe
from dsv3.data.dataset import GlobalSampler
from dsv3.model import Transformer, init_weights
from dsv3.model.step_aux import StepAux
from dsv3.rl.sft_data import Example, SFTDataset
from dsv3.rl.template import R1_SPECIAL_TOKENS
from dsv3.train.weights import load_initial_weights, model_config_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import read_metrics, run_pretrain  # noqa: E402

EXAMPLES = [Example("User: What is 2 + 3? Assistant:", " <think> 2+3=5 </think> <answer> 5 </answer>"),
            Example("User: Solve for x: x + 1 = 4 Assistant:", " <think> x = 3 </think> <answer> 3 </answer>"),
            Example("User: hi Assistant:", " <think> </think> <answer> hello </answer>")]


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(["def f(x): return x + 1  # what is the answer", "User: Assistant: solve for x"] * 40, 300)
    add_special_tokens(tok, R1_SPECIAL_TOKENS)
    return tok


def hand_masked_ce(logits_of, examples, tokenizer, eos, seq_len, packing) -> float:
    """Mean of -log p(token) over every completion token and EOS, computed per example from its own
    tokenization, with each example placed where the packing rule puts it."""
    total, count, row, used = 0.0, 0, [], []
    rows = []
    for e in examples:
        p, c = tokenizer.encode(e.prompt).ids, tokenizer.encode(e.completion).ids + [eos]
        if row and (not packing or len(row) + len(p) + len(c) > seq_len + 1):
            rows.append((row, used))
            row, used = [], []
        used.append((len(row) + len(p), len(c)))   # (first completion position, length)
        row = row + p + c
    rows.append((row, used))
    for r, (toks, spans) in enumerate(rows):
        logp = torch.log_softmax(logits_of(r).double(), -1)
        for start, n in spans:
            for pos in range(start, start + n):
                total -= float(logp[pos - 1, toks[pos]])
                count += 1
    return total / count


@pytest.mark.parametrize("packing", [True, False])
def test_sft_loss_equals_hand_computed_masked_cross_entropy(tokenizer, packing):
    from dsv3.config.schema import ModelConfig

    vocab = tokenizer.get_vocab_size()
    model = Transformer(ModelConfig(vocab_size=vocab, max_seq_len=64, mtp_depth=1)).eval()
    init_weights(model, seed=0, std=0.05)
    eos = tokenizer.token_to_id("<|endoftext|>")
    data = SFTDataset(EXAMPLES, tokenizer, eos, seq_len=60, packing=packing)
    assert (len(data) < 3) if packing else (len(data) == 3)
    rows = list(range(len(data)))
    tokens, labels, _ = data.batch(rows)
    aux = StepAux(loss_normalizer=float(data.label_count(rows)))   # one micro-batch, one rank
    with torch.no_grad():
        parts = model.losses(tokens, labels, aux=aux)
        logits = model(tokens)
    expected = hand_masked_ce(lambda r: logits[r], EXAMPLES, tokenizer, eos, 60, packing)
    assert parts.main.item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():  # no normalizer: the mean over counted labels, the same value
        assert model.losses(tokens, labels).main.item() == pytest.approx(expected, rel=1e-6)


def test_packed_rows_with_document_masks_equal_each_example_alone(tokenizer):
    """data.document_masks=true: attention stays inside each example, so the packed loss is the loss of
    every example run on its own (RoPE sees only relative positions)."""
    from dsv3.config.schema import ModelConfig

    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), max_seq_len=64, mtp_depth=0)).eval()
    init_weights(model, seed=1, std=0.05)
    eos = tokenizer.token_to_id("<|endoftext|>")
    data = SFTDataset(EXAMPLES, tokenizer, eos, seq_len=60, packing=True)
    tokens, labels, documents = data.batch(range(len(data)))
    assert len(data) < len(EXAMPLES)
    aux = StepAux(loss_normalizer=float(data.label_count(list(range(len(data))))))
    with torch.no_grad():
        packed = model.losses(tokens, labels, documents, aux).main.item()
        alone = []
        for e in EXAMPLES:
            p, c = tokenizer.encode(e.prompt).ids, tokenizer.encode(e.completion).ids + [eos]
            logp = torch.log_softmax(model(torch.tensor([p + c]))[0].double(), -1)
            alone += [-float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c)]
    assert packed == pytest.approx(sum(alone) / len(alone), rel=1e-5)


def test_labels_count_completion_tokens_and_eos_only(tokenizer):
    eos = tokenizer.token_to_id("<|endoftext|>")
    data = SFTDataset(EXAMPLES[:1], tokenizer, eos, seq_len=60, packing=True)
    tokens, labels, _ = data.batch([0])
    p = tokenizer.encode(EXAMPLES[0].prompt).ids
    c = tokenizer.encode(EXAMPLES[0].completion).ids
    counted = (labels[0] != -100).nonzero()[:, 0].tolist()
    assert counted == list(range(len(p) - 1, len(p) + len(c)))
    assert labels[0, counted].tolist() == c + [eos]
    with pytest.raises(ValueError, match="example 0 has .* tokens"):
        SFTDataset(EXAMPLES[:1], tokenizer, eos, seq_len=10, packing=True)


# -- the launcher ---------------------------------------------------------------------------------------
SFT = os.path.join(ROOT, "launch", "sft.py")


def run_sft(run_dir, *overrides, timeout=600):
    return subprocess.run([sys.executable, SFT, f"hydra.run.dir={run_dir}", "train.threads=1", "+experiment=sft_tiny",
                           *overrides], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    r = run_pretrain(str(run), "+experiment=moe_tiny", "train.max_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    return str(run / "checkpoints" / "step_00000002")


def test_sft_run_loss_is_the_masked_ce_of_its_batch_and_plan_independent(base_checkpoint, tmp_path):
    a, b = tmp_path / "mb4", tmp_path / "mb2"
    ra = run_sft(a, f"checkpoint.init_from={base_checkpoint}", "train.max_steps=3")
    assert ra.returncode == 0, ra.stderr[-3000:]
    rb = run_sft(b, f"checkpoint.init_from={base_checkpoint}", "train.max_steps=3", "train.micro_batch_size=2")
    assert rb.returncode == 0, rb.stderr[-3000:]
    c = tmp_path / "ep2"  # two ranks, experts split over them (and 2-way data parallel)
    rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SFT,
                         f"hydra.run.dir={c}", "train.threads=1", "+experiment=sft_tiny", "parallel=ep2",
                         f"checkpoint.init_from={base_checkpoint}", "train.max_steps=3"], capture_output=True,
                        text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rc.returncode == 0, rc.stderr[-3000:]
    ma, mb, mc = read_metrics(str(a)), read_metrics(str(b)), read_metrics(str(c))
    for x, y, z in zip(ma, mb, mc):  # the same mean over the batch's completion tokens, whatever the split
        for k in ("loss", "mtp_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-5) and x[k] == pytest.approx(z[k], rel=1e-5)

    # Step 1's loss, recomputed by hand: the base weights with the grown vocabulary, the first global
    # batch the sampler draws, -log p of each completion token.
    ckpt_dir = a / "checkpoints"
    tokenizer = load_tokenizer(str(ckpt_dir / "tokenizer.json"))
    cfg = model_config_of(str(ckpt_dir / "step_00000003"))
    assert cfg.vocab_size == model_config_of(base_checkpoint).vocab_size + 4
    model = Transformer(cfg).eval()
    load_initial_weights(base_checkpoint, model, cfg)
    from dsv3.config.post_training import TaskConfig
    from dsv3.rl.sft_data import task_examples

    examples = task_examples(TaskConfig(), "train", 256, "")
    eos = tokenizer.token_to_id("<|endoftext|>")
    data = SFTDataset(examples, tokenizer, eos, 160, packing=True)
    rows = GlobalSampler(len(data), 1234)(0, 8)
    tokens, labels, _ = data.batch(rows)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).double(), -1)
    mask = labels != -100
    hand = -logp[mask].gather(1, labels[mask][:, None]).sum() / mask.sum()
    assert ma[0]["loss"] == pytest.approx(float(hand), rel=1e-5)

    # the checkpoint and its tokenizer are what generation loads
    from dsv3.generate import Generator, SamplingParams
    from dsv3.train.checkpoint import load_checkpoint

    load_checkpoint(str(ckpt_dir / "step_00000003"), model, optimizer=None)
    out = Generator(model, tokenizer).generate(["User: What is 2 + 3? Assistant:"],
                                               SamplingParams(max_new_tokens=5, temperature=0))
    assert len(out.completions[0].tokens) >= 1


def test_sft_without_a_base_checkpoint_exits_2(tmp_path):
    r = run_sft(tmp_path / "x", timeout=120)
    assert r.returncode == 2 and "checkpoint.init_from" in r.stderr, r.stderr[-2000:]
    from dsv3.train.weights import checkpoint_step

    with pytest.raises(FileNotFoundError, match="neither a dsv3 checkpoint"):
        checkpoint_step(str(tmp_path))


def test_sft_from_jsonl(base_checkpoint, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": e.prompt.removeprefix("User: ").removesuffix(" Assistant:"),
                                        "completion": e.completion}) + "\n" for e in EXAMPLES * 10))
    r = run_sft(tmp_path / "run", f"checkpoint.init_from={base_checkpoint}", "sft.source=jsonl", f"sft.path={path}",
                "sft.val_examples=3", "train.max_steps=2", "sft.packing=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "30 examples" not in r.stdout and "27 examples in 27 rows" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n' * 5)
    r = run_sft(tmp_path / "run2", f"checkpoint.init_from={base_checkpoint}", "sft.source=jsonl", f"sft.path={bad}",
                "sft.val_examples=1")
    assert r.returncode != 0 and "completion" in r.stderr
