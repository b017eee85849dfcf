"""Compile every shipped Triton kernel for sm_80 / sm_89 / sm_90 without a GPU and report, per kernel
and architecture, the tensor-core instruction family of its SASS, registers, shared memory and
spills (see dsv3/kernels/triton/aot.py). With --write-docs the table in docs/kernels.md is replaced.

    python benchmarks/kernels/aot_report.py [--write-docs] [--json out.json]
"""
import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

DOC = os.path.join(ROOT, "docs", "kernels.md")
BEGIN, END = "<!-- aot-table:begin (benchmarks/kernels/aot_report.py --write-docs) -->", "<!-- aot-table:end -->"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-docs", action="store_true", help=f"replace the table between the markers in {DOC}")
    p.add_argument("--json", help="write the reports to this JSON file")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("aot_report.py compiles for GPUs: run it without TRITON_INTERPRET=1")
    import triton

    from dsv3.kernels.triton import aot
    reports = [aot.compile_report(*k) for k in aot.shipped_kernels()]
    table = aot.markdown_table(reports)
    print(table)
    bad = [r for r in reports if r.spill_stores or r.local_bytes or r.shared_bytes > aot.SMEM_LIMIT[r.arch]
           or (r.kind != "quant" and r.mma != (aot.EXPECTED_MMA[(r.kind, r.arch)],))]
    for r in bad:
        print(f"NOT OK: {r}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, reports=[dataclasses.asdict(r) for r in reports]), f, indent=1)
    if args.write_docs:
        with open(DOC) as f:
            text = f.read()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}")
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        with open(DOC, "w") as f:
            f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
        print(f"updated {DOC}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
