"""Tokenize text/JSONL files into memory-mapped token shards for `data=shards data.path=<out>`.

    python launch/prepare_data.py corpus/ more.jsonl --out data/mycorpus --vocab-size 32000
    python launch/prepare_data.py corpus/ --out data/mycorpus --tokenizer tokenizer.json

.txt/.md files are one document each; .jsonl files one document per line (field --text-key).
Without --tokenizer a byte-level BPE of --vocab-size entries is trained on the inputs first.
"""
import argparse
import itertools
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.data.corpus import file_documents  # noqa: E402
from dsv3.data.shards import write_shards  # noqa: E402
from dsv3.data.tokenizer import load_tokenizer, train_bpe  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files or directories")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="an existing tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--tokenizer-docs", type=int, default=100_000, help="documents to train the BPE on")
    p.add_argument("--text-key", default="text")
    p.add_argument("--val-fraction", type=float, default=0.01)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
        else:
            sample = itertools.islice(file_documents(args.inputs, args.text_key), args.tokenizer_docs)
            tok = train_bpe((text for _, text in sample), args.vocab_size)
        meta = write_shards(args.out, file_documents(args.inputs, args.text_key), tok, args.val_fraction,
                            extra_meta={"source": [os.path.abspath(i) for i in args.inputs]})
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = {s: sum(f["tokens"] for f in files) for s, files in meta["splits"].items()}
    print(f"wrote {args.out}: {meta['documents']} documents, {tokens['train']} train / {tokens['val']} val tokens, "
          f"vocab {meta['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
