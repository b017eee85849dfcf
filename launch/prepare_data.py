"""Tokenize text files into memory-mapped token shards for `data=shards data.path=<out>` (or a `data.blend`).

    python launch/prepare_data.py corpus/ more.jsonl.zst --out data/mycorpus --vocab-size 32000
    python launch/prepare_data.py web.parquet hf_saved_dataset/ --out data/web --tokenizer tokenizer.json --workers 8
    python launch/prepare_data.py new_files/ --out data/web --append

Inputs: .txt/.md (one document per file), .jsonl/.json, also .gz or .zst compressed (one per line, field
--text-key), .parquet (column --text-key), and directories written by `datasets.save_to_disk`.
Directories are walked recursively. Without --tokenizer a byte-level BPE of --vocab-size entries is
trained on the first --tokenizer-docs documents; a given tokenizer.json gets the FIM sentinels if it
lacks them. Interrupted? Run the same command again: it resumes from `<out>.partial`.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.data.prepare import Options, prepare  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files or directories")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="an existing tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--tokenizer-docs", type=int, default=100_000, help="documents to train the BPE on")
    p.add_argument("--text-key", default="text", help="the JSON field or parquet/Arrow column holding the text")
    p.add_argument("--hf-split", default="train", help="the split of a saved DatasetDict")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=1, help="processes tokenizing files in parallel (the output "
                                                          "does not depend on it)")
    p.add_argument("--unit-mb", type=float, default=64, help="input MB per unit of work (files are never split)")
    p.add_argument("--append", action="store_true", help="add the inputs' documents to an existing --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts = Options(text_key=args.text_key, val_fraction=args.val_fraction, hf_split=args.hf_split,
                   unit_bytes=max(1, int(args.unit_mb * 2**20)))
    try:
        meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       tokenizer_docs=args.tokenizer_docs, options=opts, workers=args.workers,
                       append=args.append, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:  # InputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    tokens = {s: sum(f["tokens"] for f in files) for s, files in meta["splits"].items()}
    print(f"wrote {args.out}: {meta['documents']} documents, {tokens['train']} train / {tokens['val']} val tokens, "
          f"vocab {meta['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
