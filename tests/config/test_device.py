"""`train.device`: one GPU per local rank. A torchrun node with more ranks than GPUs is refused before
any work (exit 2 naming the key), instead of every rank landing on cuda:LOCAL_RANK and failing there."""
import pytest
import torch

from dsv3.config import ConfigError, validate
from dsv3.config.schema import Config


def _gpus(monkeypatch, n: int, local_ranks: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_local_ranks_than_gpus_is_refused(monkeypatch, device):
    _gpus(monkeypatch, 1, 2)
    cfg = Config()
    cfg.train.device = device
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2)
    assert err.value.key == "train.device"
    assert "2 ranks on this node but 1 visible GPU(s)" in str(err.value)


def test_one_rank_per_gpu_and_cpu_runs_pass(monkeypatch):
    _gpus(monkeypatch, 2, 2)
    cfg = Config()
    validate(cfg, world_size=2)
    _gpus(monkeypatch, 1, 4)
    cfg.train.device = "cpu"
    cfg.train.global_batch_size = 4 * cfg.train.micro_batch_size
    validate(cfg, world_size=4)  # the CPU never asks how many GPUs there are
