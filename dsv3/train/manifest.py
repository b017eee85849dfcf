"""A checkpoint's manifest: every file's size and SHA-256, written just before the commit rename.

    <step dir>/manifest.json   {"format": 1, "files": {"__0_0.distcp": {"bytes": 1234, "sha256": "..."}, ...}}

Writing it reads every file back once (from the page cache, usually) and fsyncs it, so that when the
rename makes the checkpoint visible its bytes are on disk, not only in the writer's cache: a machine
that dies just after a save does not leave a complete-looking checkpoint of zero-filled pages.
Verification compares sizes (cheap: truncation, a missing file) and, unless asked not to, checksums
(flipped or zeroed bytes). Under torch.distributed both are split over the ranks, each hashing every
world_size-th file, and every rank gets the same verdict.
"""
import hashlib
import json
import os
from typing import Optional

import torch.distributed as dist

MANIFEST = "manifest.json"
_FORMAT = 1
_CHUNK = 1 << 22


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: str, sync: bool = False) -> dict:
    """Size and SHA-256 of a file; `sync`: fsync it too (any descriptor flushes the file's dirty pages)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _gather(mine: dict | list) -> list:
    """Every rank's value, by rank (the value itself when not distributed)."""
    rank, world = _rank_world()
    if world == 1:
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out


def write_manifest(directory: str) -> None:
    """Hash and fsync every file of `directory` (a collective under torch.distributed: all ranks call it
    once every rank's files are written), then rank 0 writes manifest.json and fsyncs it and the directory."""
    rank, world = _rank_world()
    names = sorted(n for n in os.listdir(directory) if n != MANIFEST) if rank == 0 else None
    if world > 1:  # one listing for all: another node's view of a shared filesystem may lag
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    mine = {n: _digest(os.path.join(directory, n), sync=True) for n in names[rank::world]}
    files = {n: entry for part in _gather(mine) for n, entry in part.items()}
    if rank == 0:
        path = os.path.join(directory, MANIFEST)
        with open(path, "w") as f:
            json.dump({"format": _FORMAT, "files": dict(sorted(files.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(directory)


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest's {file: {"bytes", "sha256"}}, or None when the directory has none."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["files"]


def verify(directory: str, checksums: bool = True, collective: bool = True) -> list[str]:
    """What is wrong with the checkpoint in `directory` (empty: intact), one phrase per damaged file.

    `collective`: under torch.distributed every rank must call it; each hashes a share of the files
    and all get the whole list. A directory without a manifest gives ["no manifest.json"]."""
    try:
        files = read_manifest(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is unreadable ({e.__class__.__name__}: {e})"]
    if files is None:
        return [f"no {MANIFEST}"]
    rank, world = _rank_world() if collective else (0, 1)
    problems = []
    for i, (name, entry) in enumerate(sorted(files.items())):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
            continue
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            problems.append(f"{name} has {size} bytes, the manifest says {entry['bytes']}")
        elif checksums and i % world == rank and _digest(path)["sha256"] != entry["sha256"]:
            problems.append(f"{name} has the right size but not the manifest's SHA-256 (its bytes changed)")
    if checksums and world > 1:
        problems = sorted({p for part in _gather(problems) for p in part})
    return problems
