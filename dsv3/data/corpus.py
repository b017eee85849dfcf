"""The embedded default corpus (users' files are read by `dsv3.data.sources`).

The embedded corpus is the Python standard library's own source code (`Lib/**/*.py`, without the test
suites and site-packages): real text, present wherever Python runs, identical on every machine with the
same Python build, and needing no download. Its fingerprint (a hash of paths and contents) names the
cache, so a different Python gets its own tokenizer and shards rather than a stale one.
"""
import hashlib
import pathlib
import sysconfig
from typing import Iterable

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
