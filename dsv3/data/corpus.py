"""Text sources: the embedded default corpus and users' text/JSONL files.

The embedded corpus is the Python standard library's own source code (`Lib/**/*.py`, without the test
suites and site-packages): real text, present wherever Python runs, identical on every machine with the
same Python build, and needing no download. Its fingerprint (a hash of paths and contents) names the
cache, so a different Python gets its own tokenizer and shards rather than a stale one.
"""
import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Iterable, Iterator

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[tuple[str, str]]:
    """(relative path, text) of every standard-library module, sorted by path."""
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        docs.append((rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")))
    return docs


def fingerprint(docs: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode())
        h.update(b"\0")
        h.update(text.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()


def _files_under(paths: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(path, name) of every text file; the name is relative to the input given, so a document's id, and
    with it the train/validation split, does not depend on where the corpus lies."""
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                for n in sorted(names):
                    if n.endswith((".txt", ".md", ".jsonl", ".json")):
                        yield os.path.join(root, n), os.path.relpath(os.path.join(root, n), p)
        elif os.path.isfile(p):
            yield p, os.path.basename(p)
        else:
            raise FileNotFoundError(f"input path {p!r} does not exist")


def file_documents(paths: Iterable[str], text_key: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) from .txt/.md files (one document each) and .jsonl files (one per line)."""
    for path, name in _files_under(paths):
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_key not in record:
                        raise KeyError(f"{path}:{i + 1}: no {text_key!r} field (pass --text-key)")
                    yield f"{name}:{i}", record[text_key]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield name, f.read()
