"""Preparation throughput: tokens/s of launch/prepare_data.py's pipeline at 1 and 2 workers.

    python benchmarks/prepare_throughput.py              # results in docs/prepare_throughput.json
    python benchmarks/prepare_throughput.py --copies 4   # a larger corpus

The corpus is the embedded one (this Python's standard-library sources, ~12 MB), written once per
`--copies` as 8 files in the formats users have: .jsonl.zst, .jsonl.gz and .parquet. The tokenizer
is a byte-level BPE of 8192 tokens trained on it first (not timed). Each configuration is timed from
the call to the finished, renamed directory: reading and decompressing, tokenizing, writing shards
and indexes. The 1-worker run is the baseline of the same invocation; runs alternate, each is repeated. Next to wall-clock tokens/s, tokens per CPU-second (this process
and its workers): on a machine shared with other work, the wall-clock gain of a second worker is
what the other processes leave of a second core (the load average is recorded), while tokens per
CPU-second show whether the work itself parallelizes without overhead.
"""
import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.data.corpus import stdlib_documents  # noqa: E402
from dsv3.data.prepare import Options, prepare  # noqa: E402
from dsv3.data.tokenizer import train_bpe  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_corpus(root: str, copies: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [text for _, text in stdlib_documents()]
    parts = [docs[i::8] for i in range(8)]
    for c in range(copies):
        for i, part in enumerate(parts):
            stem = os.path.join(root, f"copy{c}-part{i}")
            if i % 3 == 0:
                pq.write_table(pa.table({"text": part}), stem + ".parquet")
            else:
                opener = zstandard.open if i % 3 == 1 else gzip.open
                with opener(stem + (".jsonl.zst" if i % 3 == 1 else ".jsonl.gz"), "wt") as f:
                    for t in part:
                        f.write(json.dumps({"text": t}) + "\n")
    return sum(len(t.encode()) for t in docs) * copies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "prepare_throughput.json"))
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="dsv3-prepare-bench-")
    try:
        corpus = os.path.join(work, "corpus")
        os.makedirs(corpus)
        text_bytes = write_corpus(corpus, args.copies)
        tok_path = os.path.join(work, "tokenizer.json")
        train_bpe((t for _, t in stdlib_documents()), 8192).save(tok_path)
        runs, load_before = [], os.getloadavg()[0]
        for r in range(args.repeats):
            for workers in (1, 2):
                out = os.path.join(work, f"out-{workers}-{r}")
                start, cpu0 = time.perf_counter(), cpu_seconds()
                meta = prepare([corpus], out, tokenizer=tok_path, options=Options(unit_bytes=1 << 20),
                               workers=workers, progress_every=1e9)
                seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
                tokens = sum(f["tokens"] for s in meta["splits"].values() for f in s)
                runs.append({"workers": workers, "repeat": r, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                             "tokens": tokens, "tokens_per_s": round(tokens / seconds),
                             "tokens_per_cpu_s": round(tokens / cpu), "text_MB_per_s": round(text_bytes / seconds / 1e6, 2)})
                print(f"workers {workers} run {r}: {tokens:,} tokens in {seconds:.2f}s = {tokens / seconds:,.0f} tokens/s; "
                      f"{cpu:.2f} CPU-s = {tokens / cpu:,.0f} tokens per CPU-second")
                shutil.rmtree(out)
        best = {w: max(r["tokens_per_s"] for r in runs if r["workers"] == w) for w in (1, 2)}
        per_cpu = {w: max(r["tokens_per_cpu_s"] for r in runs if r["workers"] == w) for w in (1, 2)}
        result = {"corpus": f"Python {platform.python_version()} stdlib sources x{args.copies}, 8 files per copy "
                            "(.parquet, .jsonl.zst, .jsonl.gz)", "text_bytes": text_bytes,
                  "documents": meta["documents"], "tokenizer": "byte-level BPE, 8192 tokens",
                  "cpus": os.cpu_count(), "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                  "runs": runs, "best_tokens_per_s": best, "best_tokens_per_cpu_s": per_cpu,
                  "speedup_2_workers": round(best[2] / best[1], 2)}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print("\n| workers | tokens/s (best of %d) | speedup | tokens per CPU-second |\n|---|---|---|---|" % args.repeats)
        for w in (1, 2):
            print(f"| {w} | {best[w]:,} | {best[w] / best[1]:.2f}x | {per_cpu[w]:,} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
