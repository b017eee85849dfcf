"""V3's phases in miniature: pretraining at a short context with plain RoPE, then a context-extension phase
with YaRN that starts from the pretraining run's last checkpoint (`checkpoint.init_from` names the run's
checkpoint directory, as the shipped *_ext32k presets do). On long sequences the extended model's loss
beats the unextended one's (the same weights read with plain RoPE beyond the positions they saw)."""
import torch
from hydra import compose, initialize_config_dir

from dsv3.config.store import register, to_config
from dsv3.data import build_data
from dsv3.model import Transformer
from dsv3.model.rope import yarn_enabled
from dsv3.train.weights import checkpoint_step, load_initial_weights

from tests.helpers import ROOT, read_metrics, run_pretrain

SHORT, LONG = 32, 128
COMMON = ("+experiment=moe_tiny", "train.resume=none", "train.micro_batch_size=8", "train.global_batch_size=8",
          "train.val_every=0", "optim.warmup_steps=5", "optim.decay_steps=0")


def long_config(max_seq_len: int, original_seq_len: int):
    register()
    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        return to_config(compose("config", overrides=[
            "+experiment=moe_tiny", "checkpoint.dir=x", f"data.seq_len={LONG}",
            f"model.max_seq_len={max_seq_len}", f"model.original_seq_len={original_seq_len}"]))


def long_loss(checkpoints: str, max_seq_len: int, original_seq_len: int) -> float:
    """Mean next-token loss of the latest checkpoint under `checkpoints` on held-out LONG-token sequences."""
    cfg = long_config(max_seq_len, original_seq_len)
    model = Transformer(cfg.model)
    load_initial_weights(checkpoint_step(checkpoints), model, cfg.model)
    model.eval()
    _, val = build_data(cfg.data, cfg.model.vocab_size, cfg.train.seed)
    tokens = val.batch(range(16)).tokens
    with torch.no_grad():
        return model.losses(tokens[:, :-1], tokens[:, 1:]).main.item()


def test_pretrain_then_extend_with_yarn_beats_the_unextended_model_on_long_sequences(tmp_path):
    pre, ext = str(tmp_path / "pretrain"), str(tmp_path / "extend")
    r = run_pretrain(pre, *COMMON, "train.max_steps=40", f"data.seq_len={SHORT}", f"model.max_seq_len={SHORT}",
                     f"model.original_seq_len={SHORT}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_pretrain(ext, *COMMON, "train.max_steps=15", "optim.lr=5e-4", f"data.seq_len={LONG}",
                     f"model.max_seq_len={LONG}", f"model.original_seq_len={SHORT}",
                     f"model.rope_factor={LONG // SHORT}",
                     f"checkpoint.init_from={pre}/checkpoints")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initialized weights from" in r.stderr + r.stdout
    assert yarn_enabled(long_config(LONG, SHORT).model)
    first_extended = read_metrics(ext)[0]["loss"]
    fresh = read_metrics(pre)[0]["loss"]
    assert first_extended < fresh - 0.5          # the phase starts from the pretrained weights, not from scratch

    unextended = long_loss(f"{pre}/checkpoints", LONG, LONG)    # plain RoPE past the 32 positions it saw
    extended = long_loss(f"{ext}/checkpoints", LONG, SHORT)     # YaRN, trained on LONG-token sequences
    assert extended < unextended, (extended, unextended)
