"""launch/generate.py as a user runs it: a saved checkpoint and its tokenizer, greedy and speculative,
data parallel under torchrun (the single process's samples, sample for sample), bad input -> exit 2."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from dsv3.data.tokenizer import add_special_tokens, train_bpe
from dsv3.generate import Generator, SamplingParams
from dsv3.rl.template import R1_SPECIAL_TOKENS
from dsv3.train.checkpoint import save_checkpoint
from gen_cases import make_mtp_echo, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(ROOT, "launch", "generate.py")
PROMPTS = ["def main():", "import os", "class A:"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint directory as an SFT run leaves it: step directory + tokenizer.json beside it."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe(["def main():\n    import os\n    return os.getcwd()\nclass A:\n    pass\n"] * 50, 300)
    add_special_tokens(tok, R1_SPECIAL_TOKENS)
    model = make_mtp_echo(tiny_model("q_compression_yarn", std=0.1, vocab_size=tok.get_vocab_size()))
    config = yaml.safe_dump({"model": dataclasses.asdict(model.cfg), "sft": {"system_prompt": ""}})
    save_checkpoint(str(root), 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 1}, config)
    tok.save(str(root / "tokenizer.json"))
    return str(root), model, tok


def run(args, nproc=1, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, GENERATE] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", GENERATE])
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def completions(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_cli_greedy_and_speculative_equal_the_library(checkpoint):
    root, model, tok = checkpoint
    args = [root, "--json", "--temperature", "0", "--max-new-tokens", "12", "--threads", "1"]
    plain = completions(run(args + sum((["--prompt", p] for p in PROMPTS), [])))
    spec = run(args + sum((["--prompt", p] for p in PROMPTS), []) + ["--speculative", "mtp"])
    assert "MTP draft acceptance" in spec.stderr
    expected = Generator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))
    assert [c["tokens"] for c in plain] == [c.tokens for c in expected.completions]
    assert [c["tokens"] for c in completions(spec)] == [c["tokens"] for c in plain]


def test_cli_data_parallel_draws_the_single_process_samples(checkpoint, tmp_path):
    root, _, _ = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [root, "--json", "--prompts-file", str(prompts), "--num-samples", "2", "--temperature", "0.9",
            "--top-k", "20", "--max-new-tokens", "8", "--seed", "3", "--template", "r1"]
    one = completions(run(args))
    two = completions(run(args, nproc=2))
    assert [(c["prompt_index"], c["sample_index"]) for c in two] == [(i, g) for i in range(3) for g in range(2)]
    assert [c["tokens"] for c in two] == [c["tokens"] for c in one]
    assert len({tuple(c["tokens"]) for c in one}) > 1


@pytest.mark.parametrize("extra,match", [
    (["--temperature", "-1"], "--temperature=-1.0"), (["--top-p", "1.5"], "--top-p=1.5"),
    (["--prompt", "x " * 300], "max_seq_len=256"), (["--top-k", "-3"], "--top-k=-3"),
])
def test_cli_bad_input_exits_2(checkpoint, extra, match):
    root, _, _ = checkpoint
    r = run([root, "--prompt", "def", *extra])
    assert r.returncode == 2 and match in r.stderr, r.stderr[-2000:]


def test_cli_speculative_without_mtp_exits_2(tmp_path):
    tok = train_bpe(["def main(): pass"] * 20, 280)
    model = tiny_model("q_compression", vocab_size=tok.get_vocab_size(), mtp_depth=0)
    save_checkpoint(str(tmp_path), 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 1},
                    yaml.safe_dump({"model": dataclasses.asdict(model.cfg)}))
    tok.save(str(tmp_path / "tokenizer.json"))
    r = run([str(tmp_path), "--prompt", "def", "--speculative", "mtp"])
    assert r.returncode == 2 and "mtp_depth=0" in r.stderr, r.stderr[-2000:]
    r = run([str(tmp_path / "nothing_here"), "--prompt", "def"])
    assert r.returncode == 2 and "neither a dsv3 checkpoint" in r.stderr, r.stderr[-2000:]
