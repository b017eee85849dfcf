"""What a run reports beyond the loss, checked against independent computations: held-out accuracy and
the MTP module's, per-expert loads and MaxVio, peak memory (the FLOPs MFU divides by are the planner's, checked in
tests/planner/test_flops.py)."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.train.heldout import heldout_figures, heldout_names, heldout_sums
from dsv3.train.routing_stats import ExpertLoadLog, RoutedTokenCounter, max_violation


def _model(mtp_depth=2, **kw) -> Transformer:
    m = Transformer(ModelConfig(n_layers=2, mtp_depth=mtp_depth, **kw))
    init_weights(m, 0, 0.02)
    return m.eval()


def test_heldout_accuracy_and_mtp_figures_match_a_direct_computation():
    m = _model()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (3, 17), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    sums = heldout_sums(m, x, y, None, contextlib.nullcontext())
    fig = heldout_figures(sums)
    with torch.no_grad():
        main_logits = m(x)  # forward: the head on the final norm, independent of losses()
        h = m.hidden(x)
        main_guess = main_logits.argmax(-1)
        ce = F.cross_entropy(main_logits.flatten(0, 1), y.flatten()).item()
        assert fig["val_loss"] == pytest.approx(ce, rel=1e-5)
        assert fig["val_acc"] == pytest.approx((main_guess == y).float().mean().item())
        # MTP written out from the report's recurrence: depth k sees h^{k-1}_i and Emb(t_{i+k})
        for k, module in enumerate(m.mtp, start=1):
            n = x.shape[1] - k
            cos, sin = m.rope(n)
            h = module(h[:, :n], m.embed(x[:, k:]), cos, sin)
            logits = m.head(module.norm(h))
            target = y[:, k:]  # token i + k + 1
            assert fig[f"val_mtp{k}_loss"] == pytest.approx(
                F.cross_entropy(logits.flatten(0, 1), target.flatten()).item(), rel=1e-5)
            assert fig[f"val_mtp{k}_acc"] == pytest.approx((logits.argmax(-1) == target).float().mean().item())
            assert fig[f"val_mtp{k}_accept"] == pytest.approx(
                (logits.argmax(-1) == main_guess[:, k:]).float().mean().item())
    assert sorted(sums) == sorted(heldout_names(2))


def test_routed_token_counter_counts_every_token_k_times_and_maxvio_is_the_definition():
    m = _model(mtp_depth=1)
    tokens = torch.randint(0, 512, (2, 9))
    with RoutedTokenCounter(m.moe_layers(), 8, torch.device("cpu")) as counter, torch.no_grad():
        m.losses(tokens[:, :-1], tokens[:, 1:])
    k = m.cfg.n_activated_experts
    assert counter.counts[0].sum() == 2 * 8 * k  # the main model's MoE layer: every token, k experts
    assert counter.counts[1].sum() == 2 * 7 * k  # the MTP block sees one token fewer per sequence
    loads = torch.tensor([[10.0, 2.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(max_violation(loads), torch.tensor([(10 - 4) / 4, 0.0]))
    figures = RoutedTokenCounter([], 4, torch.device("cpu"), reported=[True, True, False])
    figures.counts = torch.cat([loads, torch.tensor([[0.0, 0.0, 0.0, 9.0]])])  # the last: an MTP layer
    assert figures.max_vio() == {"val_max_vio": pytest.approx(0.75), "val_max_vio_worst_layer": pytest.approx(1.5)}
    assert len(m.moe_layers()[0].gate._forward_hooks) == 0  # hooks removed


def test_expert_load_log_writes_interval_shares(tmp_path):
    log = ExpertLoadLog(str(tmp_path), True)
    log.add(torch.tensor([[3.0, 1.0], [0.0, 4.0]]))
    log.add(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    log.write(2, 2)
    log.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    log.write(3, 2)
    log.close()
    records = [json.loads(line) for line in open(tmp_path / "expert_load.jsonl")]
    assert records[0] == {"step": 2, "steps": 2, "load": [[0.5, 0.5], [0.25, 0.75]]}
    assert records[1] == {"step": 3, "steps": 1, "load": [[1.0, 0.0], [0.0, 1.0]]}


def test_peak_memory_on_the_host_grows_with_a_large_allocation():
    # In a fresh process: the peak of this one (a long test session) may already exceed anything added here.
    # Through a shell that forks it: Linux carries a process's peak RSS across exec, so a child exec'd
    # straight from here would start with this process's peak.
    code = ("import torch\n"
            "from dsv3.train.perf import peak_memory_gib\n"
            "before, kind = peak_memory_gib(torch.device('cpu'))\n"
            "big = torch.ones(64, 2 ** 20, dtype=torch.float32)  # 256 MiB, touched\n"
            "after, _ = peak_memory_gib(torch.device('cpu'))\n"
            "print(kind, before, after)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, code], capture_output=True, text=True,
                         cwd=root, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-2000:]
    kind, before, after = out.stdout.split()
    assert kind == "host" and float(before) > 0
    assert float(after) >= float(before) + 0.2, (before, after)


def test_heldout_figures_count_only_the_labels_that_count():
    """Fine-tuning masks the prompt's labels (IGNORE): accuracy and losses are over the others only."""
    from dsv3.model.transformer import IGNORE

    m = _model(mtp_depth=1)
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[:, :5] = IGNORE
    fig = heldout_figures(heldout_sums(m, x, y, None, contextlib.nullcontext()))
    with torch.no_grad():
        logits = m(x)
    keep = y != IGNORE
    assert fig["val_acc"] == pytest.approx((logits.argmax(-1) == y)[keep].float().mean().item())
    assert fig["val_loss"] == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), rel=1e-5)
    sums = heldout_sums(m, x, y, None, contextlib.nullcontext())
    assert sums["count"] == keep.sum() and sums["mtp1_count"] == keep[:, 1:].sum()
