"""Step 5 of the GPU check: one Markdown summary of everything the earlier steps wrote.

    python benchmarks/gpu/report.py DIR > DIR/summary.md

Reads DIR/steps.tsv (exit code and seconds of each step), env.json, tests.xml (JUnit), the kernel
benchmarks' JSON (rows of op/impl/ms/TFLOP/s or GB/s) and the training JSON; a missing file is
reported as missing, never filled in.
"""
import json
import os
import sys
from xml.etree import ElementTree


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def steps(d) -> list[str]:
    path = os.path.join(d, "steps.tsv")
    if not os.path.exists(path):
        return ["steps.tsv missing"]
    rows = [dict(zip(("step", "exit", "seconds"), line.rstrip("\n").split("\t"))) for line in open(path) if line.strip()]
    return _table(rows, ["step", "exit", "seconds"])


def environment(d) -> list[str]:
    env = _load(os.path.join(d, "env.json"))
    if env is None:
        return ["env.json missing"]
    return [f"- {k}: {_fmt(v)}" for k, v in env.items()]


def tests(d, name: str = "tests") -> list[str]:
    path = os.path.join(d, f"{name}.xml")
    if not os.path.exists(path):
        return [f"{name}.xml missing (the step did not run or did not finish)"]
    cases = list(ElementTree.parse(path).getroot().iter("testcase"))
    lines, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for c in cases:
        bad = [*c.iter("failure"), *c.iter("error")]
        if bad:
            counts["failed"] += 1
            lines.append(f"- FAILED `{c.get('name')}`: {(bad[0].get('message') or '').splitlines()[0][:300]}")
        elif list(c.iter("skipped")):
            counts["skipped"] += 1
            lines.append(f"- skipped `{c.get('name')}`: {(next(c.iter('skipped')).get('message') or '')[:200]}")
        else:
            counts["passed"] += 1
    return [f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"] + lines


def kernel_bench(d, name: str, title: str) -> list[str]:
    res = _load(os.path.join(d, f"{name}.json"))
    if res is None:
        return [f"### {title}", "", f"{name}.json missing"]
    rows = res.get("rows") or res.get("results") or []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [f"### {title}", ""] + _table(rows, cols)


def ratios(d, name: str, baseline: str) -> list[str]:
    """For GEMM benchmarks: each implementation's time as a fraction of the dense GEMM of the same FLOPs."""
    res = _load(os.path.join(d, f"{name}.json"))
    if res is None or res.get("mode") != "gpu":
        return []
    by_case = {}
    for r in res["rows"]:
        by_case.setdefault((r["op"], r["shape"]), {})[r["impl"]] = r.get("ms")
    out = ["", f"Time of `{baseline}` over each implementation's time (1.0 = as fast as the dense GEMM):", ""]
    impls = list(dict.fromkeys(r["impl"] for r in res["rows"]))
    rows = []
    for (op, shape), t in by_case.items():
        row = {"op": op, "shape": shape}
        for i in impls:
            if t.get(i) and t.get(baseline):
                row[i] = t[baseline] / t[i]
        rows.append(row)
    return out + _table(rows, ["op", "shape", *impls])


def training(d, name: str) -> list[str]:
    res = _load(os.path.join(d, f"{name}.json"))
    if res is None:
        return [f"{name}.json missing"]
    head = (f"{res['experiment']} on {res['machine']}: batch {res['batch']} x {res['seq_len']} tokens "
            f"({res['data']} tokens), {res['matmul_kind']} {res['matmul_tflops']:.4g} TFLOP/s measured")
    cols = ["contender", "step_s", "tokens_per_s", "speedup_vs_hf", "mfu", "mfu_datasheet", "peak_mem_gib", "first_loss"]
    out = [head, ""] + _table(res["rows"], [c for c in cols if any(c in r for r in res["rows"])])
    for contender, top in res.get("profiles", {}).items():
        out += ["", f"Top kernels of one step, {contender}:", ""] + _table(top, ["name", "ms", "share", "calls"])
    return out


def main() -> int:
    d = sys.argv[1]
    env = _load(os.path.join(d, "env.json")) or {}
    out = [f"# GPU check: {env.get('gpu', 'unknown device')}", "", "## Steps", ""] + steps(d)
    out += ["", "## Environment", ""] + environment(d)
    out += ["", "## Correctness on the GPU (tests/gpu)", ""] + tests(d)
    out += ["", "## csrc/ CPU tests with the CUDA build of the extension", ""] + tests(d, "csrc_host_tests")
    out += ["", "## Kernels", ""]
    out += kernel_bench(d, "gemm_v3", "Grouped GEMMs bf16, DeepSeek-V3 expert shape") + ratios(d, "gemm_v3", "dense same FLOPs")
    out += [""] + kernel_bench(d, "gemm_rtx", "Grouped GEMMs bf16, consumer-card (moe_rtx) shape") \
        + ratios(d, "gemm_rtx", "dense same FLOPs")
    out += [""] + kernel_bench(d, "fp8_gemm_v3", "FP8 grouped GEMMs, DeepSeek-V3 expert shape")
    out += [""] + kernel_bench(d, "fp8_quant", "FP8 quantization")
    out += [""] + kernel_bench(d, "dispatch", "csrc dispatch/combine vs PyTorch twins")
    out += [""] + kernel_bench(d, "ep_transport", "Direct EP transport: row puts vs the copy bandwidth")
    out += ["", "## Training throughput", ""] + training(d, "train_moe_small") + [""] + training(d, "train_rtx_card")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
