"""Pipeline schedules: simulated bubble and memory (the V3 report's Table 2), timeline pictures,
and, on CPU, the executor's measured idle time per rank next to the simulated one.

    python benchmarks/pipeline_bubble.py                 # everything, results under docs/
    python benchmarks/pipeline_bubble.py --skip-measure  # simulation and pictures only

Simulation uses Table 2's cost model with F:B:W = 1:2:1 and F&B = 2.5 (overlap hides half a
forward). The measurement runs the toy model of tests/pipeline/pipeline_testing.py over gloo with one
thread per rank, reads each (op, stage)'s mean duration and the P2P latency off the run, and
simulates the same schedule with those costs: the difference is what the cost model leaves out
(first-stage I/W being uneven, Python overhead, other processes on the machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: dsv3, and tests/ for the toy model

from dsv3.parallel.pipeline import SCHEDULES, Costs, build_schedule, simulate  # noqa: E402
from dsv3.parallel.pipeline.simulator import Block  # noqa: E402

COSTS = Costs(F=1.0, B=2.0, W=1.0, FB=2.5)
# The schedules of the V3 report's Table 2 (Seq1F1B's segments are compared in docs/scaling.md)
TABLE2_SCHEDULES = [name for name in SCHEDULES if name != "seq1f1b"]


def table2(name: str, pp: int, c: Costs) -> float:
    stages = 2 * pp if name == "dualpipev" else pp
    return {"1f1b": (pp - 1) * (c.F + c.B), "zb1p": (pp - 1) * (c.F + c.B - 2 * c.W),
            "dualpipe": (stages / 2 - 1) * (c.pair + c.B - 3 * c.W),
            "dualpipev": (stages / 2 - 1) * (c.pair + c.B - 3 * c.W)}[name]


def simulate_all(costs: Costs) -> list[dict]:
    rows = []
    for pp in (4, 8, 16):
        for m_per_pp in (2, 4, 8):
            m = m_per_pp * pp
            for name in TABLE2_SCHEDULES:
                res = simulate(build_schedule(name, pp, m), costs)
                rows.append(dict(
                    schedule=name, pp=pp, microbatches=m, stages=res.schedule.n_stages,
                    bubble=res.bubble, table2_bubble=table2(name, pp, costs),
                    bubble_fraction=round(res.bubble_fraction, 4),
                    makespan=res.makespan,
                    peak_activations=max(res.peak_activations),
                    peak_activations_until_w=max(res.peak_activations_until_w),
                    param_chunks=max(res.param_chunks),
                    model_fraction_per_rank=max(res.param_chunks) / res.schedule.n_stages))
    return rows


def print_sim_table(rows: list[dict]) -> None:
    print(f"simulated, costs {COSTS}")
    print(f"{'schedule':10} {'pp':>3} {'m':>4} {'bubble':>7} {'Table2':>7} {'bubble%':>8} "
          f"{'act(I)':>6} {'act(W)':>6} {'params':>6} {'model/rank':>10}")
    for r in rows:
        print(f"{r['schedule']:10} {r['pp']:>3} {r['microbatches']:>4} {r['bubble']:>7.1f} "
              f"{r['table2_bubble']:>7.1f} {100 * r['bubble_fraction']:>7.1f}% "
              f"{r['peak_activations']:>6} {r['peak_activations_until_w']:>6} "
              f"{r['param_chunks']:>5}x {r['model_fraction_per_rank']:>10.3f}")


def draw_figures(img: Path) -> list[str]:
    from dsv3.parallel.pipeline.timeline import draw_timeline
    figs = [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 8, 20), ("dualpipev", 4, 10)]
    out = []
    for name, pp, m in figs:
        res = simulate(build_schedule(name, pp, m), COSTS)
        path = draw_timeline(res, img / f"pipeline_{name}_pp{pp}_m{m}.png",
                             f"{name}: pp={pp}, {m} micro-batches, F:B:W=1:2:1, F&B=2.5 "
                             f"(bubble {res.bubble:g})")
        out.append(str(path))
    # Seq1F1B next to 1F1B's figure: the same 8 sequences, each in 4 segments of a quarter of the cost
    n = 4
    res = simulate(build_schedule("seq1f1b", 4, 8 * n, n), Costs(F=1.0 / n, B=2.0 / n, W=1.0 / n))
    out.append(str(draw_timeline(res, img / "pipeline_seq1f1b_pp4_m8x4.png",
                                 f"seq1f1b: pp=4, 8 sequences in {n} segments, F:B = 1:2 per sequence "
                                 f"(bubble {res.bubble:g}; 1f1b: {simulate(build_schedule('1f1b', 4, 8), COSTS).bubble:g})")))
    return out


# ------------------------------------------------------------------------------------------------
# measured on CPU


class MeasuredCosts:
    """Durations taken from a run, in the simulator's cost interface: `key(ins)` picks the
    measurement (an (op, stage) mean, or the instruction itself for an exact replay)."""

    def __init__(self, durations: dict, p2p: float, key):
        self.durations, self.p2p, self.key = durations, p2p, key

    def of(self, ins) -> float:
        return self.durations[self.key(ins)]


def _key(ins):
    return ins.op, tuple((p.op, p.stage) for p in ins.parts())


def measure_worker(rank: int, world: int, case: dict) -> dict:
    """Run `case` with the executor for warm-up + timed steps; return per-step timelines."""
    import torch.distributed as dist

    from dsv3.parallel.pipeline.executor import PipelineExecutor, Stage
    from tests.pipeline.pipeline_testing import toy_batches, toy_loss, toy_model

    sched = build_schedule(case["schedule"], world, case["microbatches"])
    dim, mb_size, seq = case["dim"], case["mb_size"], case["seq"]
    full = toy_model(sched.n_stages, case["layers"] // sched.n_stages, dim)
    stages = [Stage(s, full[s], toy_loss if s == sched.n_stages - 1 else None)
              for s in sched.stages_on_rank(rank)]
    ex = PipelineExecutor(sched, stages, act_shape=(mb_size, seq, dim))
    batches = toy_batches(case["warmup"] + case["steps"], case["microbatches"], mb_size, seq)
    # P2P latency: half a round trip of one activation
    peer, buf = rank ^ 1, torch.zeros(mb_size, seq, dim)
    rtts = []
    if peer < world:
        for _ in range(20):
            t = time.perf_counter()
            if rank % 2 == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
            rtts.append(time.perf_counter() - t)
    steps = []
    for k, (inputs, targets) in enumerate(batches):
        for st in stages:
            st.module.zero_grad(set_to_none=True)
        dist.barrier()
        res = ex.step(inputs, targets)
        ex.reduce_mirrored_grads()
        if k >= case["warmup"]:
            steps.append(dict(t0=res.t0, wall=res.wall,
                              timeline=[(repr(i), _key(i), s, e) for i, s, e in res.timeline]))
    return dict(steps=steps, rtt=statistics.median(rtts) if rtts else 0.0)


def measure(pp: int, name: str, m: int, steps: int) -> dict:
    from tests.parallel.distributed_testing import run_ranks

    case = dict(schedule=name, microbatches=m, dim=256, mb_size=8, seq=32, layers=8,
                warmup=1, steps=steps)
    ranks = run_ranks(measure_worker, pp, case, timeout=600)
    sched = build_schedule(name, pp, m)
    # the step of median makespan, on one time axis (perf_counter is CLOCK_MONOTONIC)
    per_step = []
    for k in range(steps):
        t0 = min(r["steps"][k]["t0"] for r in ranks)
        end = max(r["steps"][k]["t0"] + r["steps"][k]["wall"] for r in ranks)
        per_step.append((end - t0, k))
    makespan, k = sorted(per_step)[len(per_step) // 2]
    t0 = min(r["steps"][k]["t0"] for r in ranks)
    busy = [sum(e - s for _, _, s, e in r["steps"][k]["timeline"]) for r in ranks]
    durations = defaultdict(list)
    for r in ranks:
        for step in r["steps"]:
            for _, key, s, e in step["timeline"]:
                durations[key].append(e - s)
    p2p = statistics.median(r["rtt"] for r in ranks) / 2
    sim = simulate(sched, MeasuredCosts({key: statistics.mean(v) for key, v in durations.items()},
                                        p2p, _key))
    # replay: every instruction with the duration it took in this very step
    exact = {text: e - s for r in ranks for text, _, s, e in r["steps"][k]["timeline"]}
    replay = simulate(sched, MeasuredCosts(exact, p2p, repr))
    blocks = []
    for rank, r in enumerate(ranks):
        for text, key, s, e in r["steps"][k]["timeline"]:
            ins = next(i for i in sched.compute(rank) if repr(i) == text)
            off = r["steps"][k]["t0"] - t0
            blocks.append(Block(rank, ins, off + s, off + e))
    by_op = defaultdict(list)
    for (op, _), v in durations.items():
        by_op[op.value].extend(v)
    return dict(schedule=name, pp=pp, microbatches=m, makespan_ms=1e3 * makespan,
                sim_makespan_ms=1e3 * sim.makespan, replay_makespan_ms=1e3 * replay.makespan,
                measured_idle_ms=[round(1e3 * (makespan - b), 1) for b in busy],
                simulated_idle_ms=[round(1e3 * x, 1) for x in sim.idle],
                replay_idle_ms=[round(1e3 * x, 1) for x in replay.idle],
                mean_cost_ms={op: round(1e3 * statistics.mean(v), 2) for op, v in by_op.items()},
                p2p_ms=round(1e3 * p2p, 3), blocks=blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="docs", help="JSON goes to OUT/, pictures to OUT/img/")
    ap.add_argument("--skip-measure", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    out, img = Path(args.out), Path(args.out) / "img"
    rows = simulate_all(COSTS)
    print_sim_table(rows)
    bad = [r for r in rows if r["bubble"] != r["table2_bubble"]]
    print(f"\nTable 2 reproduced exactly in {len(rows) - len(bad)}/{len(rows)} rows")
    results = dict(costs=vars(COSTS), simulated=rows, figures=draw_figures(img))
    if not args.skip_measure:
        torch.set_num_threads(1)
        measured = []
        for pp, m in [(2, 8), (4, 8)]:
            for name in TABLE2_SCHEDULES:
                row = measure(pp, name, m, args.steps)
                blocks = row.pop("blocks")
                if pp == 2:
                    from dsv3.parallel.pipeline.timeline import draw_timeline
                    results["figures"].append(str(draw_timeline(
                        blocks, img / f"pipeline_measured_{name}_pp{pp}_m{m}.png",
                        f"{name}, measured on CPU over gloo: pp={pp}, {m} micro-batches",
                        build_schedule(name, pp, m))))
                measured.append(row)
                print(f"measured {name:10} pp={pp} m={m}: step {row['makespan_ms']:.0f} ms "
                      f"(simulated {row['sim_makespan_ms']:.0f}, replayed "
                      f"{row['replay_makespan_ms']:.0f}); idle per rank: measured "
                      f"{row['measured_idle_ms']}, simulated {row['simulated_idle_ms']}, "
                      f"replayed {row['replay_idle_ms']} ms; mean costs {row['mean_cost_ms']} "
                      f"ms, p2p {row['p2p_ms']} ms", flush=True)
        results["measured"] = measured
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_bubble.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / 'pipeline_bubble.json'} and {len(results['figures'])} pictures",
          file=sys.stderr)


if __name__ == "__main__":
    main()
