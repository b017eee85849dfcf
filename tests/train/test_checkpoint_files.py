"""Checkpoint files: the manifest catches every kind of damage, loading runs no code from the files, and
the RNG states survive the trip as plain tensors."""
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights
from dsv3.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from dsv3.train.manifest import MANIFEST, verify
from dsv3.train.optim import AdamW


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    m = Transformer(ModelConfig(n_layers=2))
    init_weights(m, 0, 0.02)
    opt = AdamW(m.parameters(), lr=1e-3)
    m.losses(torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8))).main.backward()
    opt.step()
    tok = root / "tok.json"
    tok.write_text('{"not": "a real tokenizer, only carried"}')
    return save_checkpoint(str(root), 5, m, opt, {"step": 5, "consumed_samples": 40}, "model: {}\n",
                           tokenizer=str(tok)), m


@pytest.fixture
def copy(saved, tmp_path):
    path = str(tmp_path / "step_00000005")
    shutil.copytree(saved[0], path)
    return path


def test_the_manifest_lists_every_file_with_its_size_and_checksum(saved):
    path = saved[0]
    with open(os.path.join(path, MANIFEST)) as f:
        files = json.load(f)["files"]
    assert sorted(files) == sorted(n for n in os.listdir(path) if n != MANIFEST)
    assert {".metadata", "config.yaml", "rng_rank0.pt", "tokenizer.json"} <= set(files)
    for name, entry in files.items():
        assert entry["bytes"] == os.path.getsize(os.path.join(path, name)) and len(entry["sha256"]) == 64
    assert verify(path) == []


def _data_file(path: str) -> str:
    return os.path.join(path, next(n for n in os.listdir(path) if n.endswith(".distcp")))


def test_truncation_a_flipped_byte_and_a_missing_file_are_each_named(copy):
    data = _data_file(copy)
    size = os.path.getsize(data)
    with open(data, "r+b") as f:  # one bit, same size: only the checksum sees it
        f.seek(size // 2)
        byte = f.read(1)[0]
        f.seek(size // 2)
        f.write(bytes([byte ^ 1]))
    assert verify(copy, checksums=False) == []
    assert verify(copy) == [f"{os.path.basename(data)} has the right size but not the manifest's SHA-256 "
                            "(its bytes changed)"]
    os.truncate(data, 100)
    os.remove(os.path.join(copy, "rng_rank0.pt"))
    problems = verify(copy, checksums=False)
    assert problems == [f"{os.path.basename(data)} has 100 bytes, the manifest says {size}", "rng_rank0.pt is missing"]
    with open(os.path.join(copy, MANIFEST), "w") as f:
        f.write("{")
    assert verify(copy)[0].startswith("manifest.json is unreadable")


def test_a_checkpoint_without_manifest_is_accepted_with_a_warning(copy, caplog):
    os.remove(os.path.join(copy, MANIFEST))  # as written before manifests existed
    assert verify(copy) == ["no manifest.json"]
    assert verify_checkpoint(copy) == []
    assert "cannot be verified" in caplog.text


class _Payload:
    """Unpickling this calls os.system: what a hostile checkpoint would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_in_metadata_and_rng_files(copy, saved, tmp_path):
    marker = str(tmp_path / "code_ran")
    model = saved[1]
    opt = AdamW(model.parameters(), lr=1e-3)
    original = open(os.path.join(copy, ".metadata"), "rb").read()
    with open(os.path.join(copy, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(CheckpointError, match=r"\.metadata cannot be read safely: .*posix\.system"):
        load_checkpoint(copy, model, opt)
    with open(os.path.join(copy, ".metadata"), "wb") as f:
        f.write(original)
    torch.save({"torch": _Payload(marker)}, os.path.join(copy, "rng_rank0.pt"))
    with pytest.raises(CheckpointError, match="rng_rank0.pt holds more than RNG states"):
        load_checkpoint(copy, model, opt)
    assert not os.path.exists(marker)


def test_rng_states_are_restored_from_tensors(tmp_path, saved):
    m, opt = saved[1], AdamW(saved[1].parameters(), lr=1e-3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy caches the second Gaussian of a pair: that is state too
    path = save_checkpoint(str(tmp_path), 1, m, opt, {"step": 1, "consumed_samples": 0}, "")
    expected = (random.random(), np.random.normal(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_checkpoint(path, m, opt)
    assert (random.random(), np.random.normal(), torch.rand(1)) == expected


def manifest_worker(rank: int, world: int, directory: str) -> list[list[str]]:
    """Two ranks share the hashing: the manifest lists every file once, and a byte changed in a file
    that only the other rank hashes is still reported on both."""
    import torch.distributed as dist

    from dsv3.train.manifest import read_manifest, write_manifest

    if rank == 0:
        for i in range(5):
            with open(os.path.join(directory, f"part_{i}.bin"), "wb") as f:
                f.write(bytes([i]) * (1000 + i))
    dist.barrier()
    write_manifest(directory)
    dist.barrier()
    assert sorted(read_manifest(directory)) == [f"part_{i}.bin" for i in range(5)]
    intact = verify(directory)
    dist.barrier()
    if rank == 0:  # sorted files are hashed round-robin: part_1 and part_3 are rank 1's
        with open(os.path.join(directory, "part_3.bin"), "r+b") as f:
            f.write(b"\xff")
    dist.barrier()
    return [intact, verify(directory)]


def test_ranks_share_the_hashing_and_agree_on_the_damage(tmp_path):
    from tests.parallel.distributed_testing import run_ranks

    results = run_ranks(manifest_worker, 2, str(tmp_path))
    damaged = ["part_3.bin has the right size but not the manifest's SHA-256 (its bytes changed)"]
    assert results == [[[], damaged], [[], damaged]]
