"""Users' input files, read as a stream of (document id, text), whatever their format.

    .txt .md                          one document per file
    .jsonl .json (.gz, .zst)          one document per line, its text in a field (`text_key`)
    .parquet                          one document per row, its text in a column (`text_key`)
    a Hugging Face `datasets` directory written by `save_to_disk` (its Arrow files; a DatasetDict: one split)

Every reader streams: memory holds one line or one record batch, never a file. A document's id is the
file's path relative to the input given, plus the line or row number, so the train/validation split
does not depend on where the corpus lies. Bad input raises `InputError` naming the file (and line).
"""
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

JSONL = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TEXT = (".txt", ".md")
PARQUET = (".parquet",)
ARROW = (".arrow",)  # only inside a saved `datasets` directory
_BATCH_ROWS = 1024


class InputError(ValueError):
    """An input file that cannot be prepared: which file, where, and why."""


@dataclass(frozen=True)
class Source:
    path: str
    name: str
    """The path relative to the input given; document ids start with it."""
    kind: str
    """text, jsonl, parquet or arrow."""
    size: int
    """Bytes on disk: sizes the units of work and measures progress."""


def _kind(path: str) -> str | None:
    for kind, suffixes in (("jsonl", JSONL), ("text", TEXT), ("parquet", PARQUET)):
        if path.endswith(suffixes):
            return kind
    return None


def _saved_dataset(directory: str, name: str, split: str) -> list[Source] | None:
    """The Arrow files of a `datasets.save_to_disk` directory, in row order; None if it is not one."""
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        with open(os.path.join(directory, "dataset_dict.json")) as f:
            splits = json.load(f)["splits"]
        if split not in splits:
            raise InputError(f"{directory}: a saved DatasetDict without split {split!r} (it has "
                             f"{', '.join(splits)}; pass --hf-split)")
        return _saved_dataset(os.path.join(directory, split), os.path.join(name, split), split)
    state = os.path.join(directory, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state) as f:
        files = [d["filename"] for d in json.load(f)["_data_files"]]
    sources = []
    for fname in files:
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise InputError(f"{directory}: state.json lists {fname}, which is missing")
        sources.append(Source(path, os.path.join(name, fname), "arrow", os.path.getsize(path)))
    return sources


def find_sources(inputs: Iterable[str], hf_split: str = "train") -> list[Source]:
    """Every input file, in a deterministic order: inputs as given, directories walked in sorted order."""
    sources: list[Source] = []
    for given in inputs:
        if os.path.isdir(given):
            saved = _saved_dataset(given, "", hf_split)
            if saved is not None:
                sources += saved
                continue
            for root, dirs, names in os.walk(given):
                dirs.sort()
                rel_root = os.path.relpath(root, given)
                for d in list(dirs):  # a saved dataset inside the tree is read as one, not walked into
                    saved = _saved_dataset(os.path.join(root, d), os.path.normpath(os.path.join(rel_root, d)), hf_split)
                    if saved is not None:
                        sources += saved
                        dirs.remove(d)
                for n in sorted(names):
                    path = os.path.join(root, n)
                    if _kind(path) is not None:
                        sources.append(Source(path, os.path.relpath(path, given), _kind(path), os.path.getsize(path)))
        elif os.path.isfile(given):
            if _kind(given) is None:
                raise InputError(f"{given}: unknown format (expected {', '.join(TEXT + JSONL + PARQUET)}, "
                                 "or a directory saved by datasets.save_to_disk)")
            sources.append(Source(given, os.path.basename(given), _kind(given), os.path.getsize(given)))
        else:
            raise FileNotFoundError(f"input path {given!r} does not exist")
    if not sources:
        raise InputError(f"no input files in {', '.join(inputs)} (looked for {', '.join(TEXT + JSONL + PARQUET)} "
                         "and saved datasets)")
    return sources


def _need(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise InputError(f"reading {what} needs the `{module.split('.')[0]}` package: "
                         "pip install -e '.[data]'") from None


def _open_text(source: Source) -> tuple[io.TextIOBase, io.RawIOBase]:
    """A text stream over a possibly compressed file, and the raw file (whose position is the progress)."""
    raw = open(source.path, "rb")
    if source.path.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw)
    elif source.path.endswith(".zst"):
        zstd = _need("zstandard", f"{source.path} (.zst)")
        stream = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    else:
        stream = raw
    return io.TextIOWrapper(io.BufferedReader(stream) if stream is not raw else stream, encoding="utf-8"), raw


def _jsonl(source: Source, text_key: str) -> Iterator[tuple[str, str, int]]:
    text, raw = _open_text(source)
    with text, raw:
        line_no = 0
        try:
            for line_no, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{source.path}:{line_no}: not a JSON object ({e.msg})") from None
                if not isinstance(record, dict) or text_key not in record:
                    raise InputError(f"{source.path}:{line_no}: no {text_key!r} field (pass --text-key)")
                yield f"{source.name}:{line_no - 1}", _text(record[text_key], source, line_no), raw.tell()
        except InputError:
            raise
        except Exception as e:  # corrupt or truncated compression (gzip, zstandard errors), bad UTF-8
            raise InputError(f"{source.path}: unreadable after line {line_no}: {type(e).__name__}: {e}") from None


def _text(value, source: Source, where) -> str:
    if not isinstance(value, str):
        raise InputError(f"{source.path}:{where}: the text is {type(value).__name__}, not a string")
    return value


def _batches(source: Source, text_key: str) -> Iterator[tuple[list, int]]:
    """Record batches of the text column of a parquet or Arrow file, and the bytes read so far."""
    pa = _need("pyarrow", f"{source.path}")
    try:
        if source.kind == "parquet":
            pq = _need("pyarrow.parquet", f"{source.path}")
            f = pq.ParquetFile(source.path)
            names, rows = f.schema_arrow.names, f.metadata.num_rows
            if text_key not in names:
                raise InputError(f"{source.path}: no column {text_key!r} (it has {', '.join(names)}; pass --text-key)")
            done = 0
            for batch in f.iter_batches(batch_size=_BATCH_ROWS, columns=[text_key]):
                done += batch.num_rows
                yield batch.column(0).to_pylist(), source.size * done // max(rows, 1)
        else:
            with pa.memory_map(source.path) as mm:
                reader = pa.ipc.open_stream(mm)
                if text_key not in reader.schema.names:
                    raise InputError(f"{source.path}: no column {text_key!r} (it has "
                                     f"{', '.join(reader.schema.names)}; pass --text-key)")
                for batch in reader:
                    # slice a datasets batch (1000 rows by default) so memory stays small whatever it wrote
                    column = batch.column(text_key)
                    for start in range(0, len(column), _BATCH_ROWS):
                        yield column.slice(start, _BATCH_ROWS).to_pylist(), mm.tell()
    except pa.ArrowException as e:
        raise InputError(f"{source.path}: unreadable: {e}") from None


def _rows(source: Source, text_key: str) -> Iterator[tuple[str, str, int]]:
    row = 0
    for texts, position in _batches(source, text_key):
        for text in texts:
            if text is None:
                raise InputError(f"{source.path}: row {row}: the {text_key!r} column is null")
            yield f"{source.name}:{row}", _text(text, source, f"row {row}"), position
            row += 1


def read_documents(source: Source, text_key: str = "text") -> Iterator[tuple[str, str, int]]:
    """(document id, text, input bytes read so far) of one file; empty documents are skipped, an empty
    file is an error."""
    if source.kind == "text":
        try:
            with open(source.path, encoding="utf-8", errors="replace") as f:
                docs = iter([(source.name, f.read(), source.size)])
        except OSError as e:
            raise InputError(f"{source.path}: unreadable: {e}") from None
    elif source.kind == "jsonl":
        docs = _jsonl(source, text_key)
    else:
        docs = _rows(source, text_key)
    n = 0
    try:
        for doc_id, text, position in docs:
            if text:
                n += 1
                yield doc_id, text, position
    except OSError as e:
        raise InputError(f"{source.path}: unreadable: {e}") from None
    if n == 0:
        raise InputError(f"{source.path}: no documents (the file is empty, or every text in it is)")


def file_documents(paths: Iterable[str], text_key: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) of every input, in order."""
    for source in find_sources(paths):
        for doc_id, text, _ in read_documents(source, text_key):
            yield doc_id, text
