"""Preparing shards from users' files: streaming, parallel over files, resumable, appendable.

The inputs are cut into *units of work*: runs of consecutive files of at least `unit_bytes` together
(a large file is a unit by itself). Each unit is tokenized by one worker into its own shard files,
named by the unit's number, and marked done by a small JSON file written last. The shard directory
lists the units' files in unit order, so its content depends on the inputs, the tokenizer and the
options only: not on the number of workers, nor on where an interrupted preparation stopped.

Everything is written under `<out>.partial/` (with the plan it follows): running the same command
again after an interruption skips the units already done; when all are, the directory is renamed to
`<out>` (or, with `append=True`, its new files move into `<out>` and meta.json is replaced atomically).
"""
import glob
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Iterator

from dsv3.data.shards import (META, SPLITS, UnitEncoder, build_meta, index_file, read_meta, write_json_atomic)
from dsv3.data.sources import InputError, Source, find_sources, read_documents
from dsv3.data.tokenizer import ensure_fim_tokens, eos_id, load_tokenizer, tokenizer_digest, train_bpe

log = logging.getLogger(__name__)
PLAN = "plan.json"
BATCH_DOCS = 256


@dataclass
class Options:
    text_key: str = "text"
    val_fraction: float = 0.01
    hf_split: str = "train"
    unit_bytes: int = 64 << 20
    """Input bytes per unit of work (at least; a file is never split). Part of the plan: changing it
    changes where shard files start (not the samples)."""


def plan_units(sources: list[Source], unit_bytes: int) -> list[list[Source]]:
    units, current, size = [], [], 0
    for s in sources:
        current.append(s)
        size += s.size
        if size >= unit_bytes:
            units.append(current)
            current, size = [], 0
    if current:
        units.append(current)
    return units


# -- one unit, in a worker ---------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(tokenizer_json: str, counters, options: Options, directory: str) -> None:
    from tokenizers import Tokenizer

    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), counters=counters, options=options,
                   directory=directory, tick=None)


def _unit_documents(sources: list[Source], text_key: str) -> Iterator[tuple[str, str, int]]:
    """The unit's documents, with the input bytes of the unit read so far."""
    offset = 0
    for s in sources:
        for doc_id, text, position in read_documents(s, text_key):
            yield doc_id, text, offset + position
        offset += s.size


def _marker(directory: str, unit: int) -> str:
    return os.path.join(directory, f"unit-{unit:05d}.json")


def _run_unit(job: tuple[int, list[Source]]) -> dict:
    """Tokenize one unit into its shard files; returns (and records) what it wrote."""
    unit, sources = job
    w, opts = _worker, _worker["options"]
    for stale in glob.glob(os.path.join(w["directory"], f"*-{unit:05d}-*.*")):  # an interrupted earlier attempt
        os.remove(stale)
    encoder = UnitEncoder(w["directory"], unit, w["tokenizer"], opts.val_fraction)
    docs, tokens, read = w["counters"]
    batch, reported = [], 0
    for doc_id, text, position in _unit_documents(sources, opts.text_key):
        batch.append((doc_id, text))
        if len(batch) == BATCH_DOCS:
            n = encoder.add(batch)
            with docs.get_lock():
                docs.value += len(batch)
                tokens.value += n
                read.value += position - reported
            reported, batch = position, []
            if w["tick"] is not None:
                w["tick"]()
    if batch:
        n = encoder.add(batch)
        with docs.get_lock():
            docs.value += len(batch)
            tokens.value += n
    with docs.get_lock():
        read.value += sum(s.size for s in sources) - reported
    result = {"unit": unit, "sources": [s.name for s in sources], **encoder.close()}
    write_json_atomic(_marker(w["directory"], unit), result)  # last: the unit is done
    return result


# -- progress ----------------------------------------------------------------------------------------------
class Progress:
    """One line every `every` seconds: share of the input read, documents, tokens, tokens/s, ETA."""

    def __init__(self, counters, total_bytes: int, done_bytes: int, workers: int, every: float = 5.0):
        self.counters, self.total, self.done_before, self.workers, self.every = counters, total_bytes, done_bytes, workers, every
        self.start = self.last = time.time()

    def line(self) -> str:
        docs, tokens, read = (c.value for c in self.counters)
        elapsed = max(time.time() - self.start, 1e-9)
        frac = min(1.0, (self.done_before + read) / max(self.total, 1))
        rate = read / elapsed
        eta = (self.total - self.done_before - read) / rate if rate > 0 else float("nan")
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
        return (f"prepare {frac:4.0%} [{bar}] {(self.done_before + read) / 1e6:,.1f}/{self.total / 1e6:,.1f} MB | "
                f"{self.workers} worker{'s' if self.workers > 1 else ''} | {docs:,} docs | {tokens:,} tokens | "
                f"{tokens / elapsed:,.0f} tokens/s | eta {eta_s}")

    def tick(self, force: bool = False) -> None:
        if force or time.time() - self.last >= self.every:
            self.last = time.time()
            log.info("%s", self.line())


# -- the whole preparation ---------------------------------------------------------------------------------
def _source_key(s: Source) -> list:
    return [s.name, os.path.abspath(s.path), s.size, int(os.path.getmtime(s.path))]


def _user_tokenizer(path: str):
    try:
        return load_tokenizer(path)
    except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
        raise InputError(f"--tokenizer {path}: not a readable tokenizer.json ({e})") from None


def _tokenizer_for(partial: str, tokenizer_path: str | None, base: dict | None, out: str,
                   vocab_size: int, tokenizer_docs: int, sources: list[Source], opts: Options):
    saved = os.path.join(partial, "tokenizer.json")
    if os.path.isfile(saved):  # resuming: the tokenizer the done units were made with
        return load_tokenizer(saved)
    if base is not None:
        tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
        if tokenizer_path and tokenizer_digest(_user_tokenizer(tokenizer_path)) != base["tokenizer_sha256"]:
            raise InputError(f"--tokenizer {tokenizer_path} differs from the tokenizer of {out}, which "
                             "--append keeps (omit --tokenizer)")
    elif tokenizer_path:
        tok = _user_tokenizer(tokenizer_path)
        eos_id(tok)  # has an end-of-text token, or a clear error
        added = ensure_fim_tokens(tok)
        if added:
            log.info("added the FIM sentinels %s to the tokenizer (ids %d-%d), for data.fim_rate", ", ".join(added),
                     tok.token_to_id(added[0]), tok.token_to_id(added[-1]))
    else:
        start = time.time()

        def sample():
            n = 0
            for s in sources:
                for _, text, _ in read_documents(s, opts.text_key):
                    yield text
                    n += 1
                    if n >= tokenizer_docs:
                        return

        tok = train_bpe(sample(), vocab_size)
        log.info("trained a %d-token byte-level BPE on up to %d documents in %.0fs", vocab_size, tokenizer_docs,
                 time.time() - start)
    tok.save(saved)
    return tok


def prepare(inputs: list[str], out: str, tokenizer: str | None = None, vocab_size: int = 32000,
            tokenizer_docs: int = 100_000, options: Options | None = None, workers: int = 1,
            append: bool = False, overwrite: bool = False, progress_every: float = 5.0) -> dict:
    """Tokenize `inputs` into the shard directory `out`; returns its meta. See the module docstring."""
    opts = options or Options()
    out = out.rstrip("/")
    if not 0 < opts.val_fraction < 0.5:
        raise InputError(f"--val-fraction {opts.val_fraction}: must be in (0, 0.5)")
    if workers < 1:
        raise InputError(f"--workers {workers}: must be >= 1")
    exists = os.path.isfile(os.path.join(out, META))
    if exists and not (append or overwrite):
        raise InputError(f"{out} already holds prepared shards: pass --append to add documents to it, or "
                         "--overwrite to replace it")
    if append and not exists:
        raise InputError(f"--append: {out} holds no prepared shards (no {META})")
    base = read_meta(out) if append else None
    if base is not None and base.get("format", 1) < 2:
        raise InputError(f"--append: {out} was prepared by an older version (no document index); prepare it anew")
    if os.path.exists(out) and not exists and os.listdir(out):
        raise InputError(f"{out} exists and is not a shard directory; choose another --out")

    sources = find_sources(inputs, opts.hf_split)
    units = plan_units(sources, opts.unit_bytes)
    first_unit = base["units"] if base is not None else 0
    plan = {"sources": [_source_key(s) for s in sources], "options": asdict(opts),
            "tokenizer": (f"file:{tokenizer_digest(_user_tokenizer(tokenizer))}" if tokenizer and base is None
                          else f"bpe:{vocab_size}:{tokenizer_docs}" if base is None else "append"),
            "append_to": base["tokenizer_sha256"] + f":{base['units']}:{base['documents']}" if base else None}
    partial = f"{out}.partial"
    if os.path.isdir(partial):
        try:
            previous = read_meta_file(os.path.join(partial, PLAN))
        except (OSError, ValueError):
            previous = None
        if previous != plan:  # another command was interrupted here: its units are not this one's
            log.warning("discarding %s: an interrupted preparation of other inputs or options (%d units done)",
                        partial, len(glob.glob(os.path.join(partial, "unit-*.json"))))
            shutil.rmtree(partial)
    if not os.path.isdir(partial):
        os.makedirs(partial)
        write_json_atomic(os.path.join(partial, PLAN), plan)

    try:
        tok = _tokenizer_for(partial, tokenizer, base, out, vocab_size, tokenizer_docs, sources, opts)
        jobs = [(first_unit + i, u) for i, u in enumerate(units)]
        pending = [j for j in jobs if not os.path.isfile(_marker(partial, j[0]))]
        if len(pending) < len(jobs):
            log.info("resuming %s: %d of %d units already done", partial, len(jobs) - len(pending), len(jobs))
        total = sum(s.size for s in sources)
        done_bytes = total - sum(s.size for _, u in pending for s in u)
        _run_pending(pending, tok, opts, partial, workers, total, done_bytes, progress_every)
    except (InputError, ValueError):
        # Bad input: nothing is left behind, unless units were finished (a run with the same plan, e.g. after
        # fixing a file's permissions, resumes from them; any other run discards them).
        if not glob.glob(os.path.join(partial, "unit-*.json")):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        return _finish(partial, out, jobs, tok, base, inputs, overwrite)
    except ValueError:  # e.g. an empty split: this plan cannot succeed, whatever is resumed
        shutil.rmtree(partial, ignore_errors=True)
        raise


def read_meta_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _run_pending(pending, tok, opts, partial, workers, total, done_bytes, every) -> None:
    # Each worker tokenizes on one core: parallelism comes from the workers (and the tokens/s per worker
    # count is honest); the Rust thread pool would oversubscribe the cores the workers already use.
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    counters = tuple(ctx.Value("q", 0) for _ in range(3))  # documents, tokens, input bytes read
    progress = Progress(counters, total, done_bytes, min(workers, max(len(pending), 1)), every)
    start = time.time()
    try:
        if workers == 1 or len(pending) <= 1:
            _init_worker(tok.to_str(), counters, opts, partial)
            _worker["tick"] = progress.tick
            for job in pending:
                _run_unit(job)
        else:
            with ctx.Pool(workers, _init_worker, (tok.to_str(), counters, opts, partial)) as pool:
                results = pool.imap_unordered(_run_unit, pending)
                for _ in pending:
                    while True:
                        try:
                            results.next(timeout=min(every, 1.0))
                            break
                        except mp.TimeoutError:
                            progress.tick()
    except KeyboardInterrupt:
        log.warning("interrupted: the units done so far are kept in %s; run the same command again to resume",
                    partial)
        raise
    finally:
        _worker.clear()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
    if pending:
        progress.tick(force=True)
        elapsed = time.time() - start
        log.info("tokenized %d documents, %d tokens in %.1fs: %.0f tokens/s with %d worker(s)", counters[0].value,
                 counters[1].value, elapsed, counters[1].value / max(elapsed, 1e-9), progress.workers)


def _finish(partial: str, out: str, jobs, tok, base: dict | None, inputs: list[str], overwrite: bool) -> dict:
    done = [read_meta_file(_marker(partial, unit)) for unit, _ in jobs]
    splits = {s: (base["splits"][s] if base else []) + [f for d in done for f in d["splits"][s]] for s in SPLITS}
    documents = (base["documents"] if base else 0) + sum(d["documents"] for d in done)
    sources = (base["source"] if base else []) + [os.path.abspath(i) for i in inputs]
    meta = build_meta(tok, splits, documents, {"units": jobs[-1][0] + 1, "source": sources})
    if base is None:
        for unit, _ in jobs:
            os.remove(_marker(partial, unit))
        os.remove(os.path.join(partial, PLAN))
        write_json_atomic(os.path.join(partial, META), meta)
        if os.path.exists(out):  # empty, or replaced on --overwrite: never lost before the new one is whole
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(partial, out)
            shutil.rmtree(old)
        else:
            os.rename(partial, out)
    else:
        for d in done:  # new shard files join the directory under names no meta lists yet
            for s in SPLITS:
                for f in d["splits"][s]:
                    for name in (f["file"], index_file(f["file"])):
                        if os.path.exists(os.path.join(partial, name)):
                            os.replace(os.path.join(partial, name), os.path.join(out, name))
        write_json_atomic(os.path.join(out, META), meta)  # the moment the appended documents exist
        shutil.rmtree(partial)
    return meta
