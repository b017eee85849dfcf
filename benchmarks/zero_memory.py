"""Memory and traffic of the data-parallel options, per plan at world size 4 on CPU, in one run.

    python benchmarks/zero_memory.py          # ~30 minutes on 2 shared cores; writes docs/zero_memory.json

For each plan (dp=4; dp=4 x ep=2, without the all-to-all overlap, which full checkpointing cannot join;
pp=2 x dp=2 with 1F1B) and each data-parallel option (plain, ZeRO-1,
ZeRO-2, ZeRO-1 + optimizer offload, and plain with full activation checkpointing), 4 gloo processes
train the moe_small model (16 sequences of 128 tokens per step: two micro-batches per dp rank, so that
ZeRO-2's partitioned gradients between micro-batches show) for a few steps through the plan interface
and report, per rank:
tokens/s; bytes moved per step by each kind of collective (a counting wrapper around
torch.distributed's functions, through which DeepSpeed's collectives pass too: all_reduce,
reduce_scatter, all_gather, all_to_all, broadcast, point-to-point); optimizer state (AdamW moments and
step counts, summed over the tensors) and the ZeRO fp32 master-weight partitions; the peak of
allocated memory during a step (dsv3/train/memory.py). Plus the optimizer step alone, the old
per-parameter loop (a host synchronization per parameter) against the foreach AdamW, on moe_small's
parameters, one process.
"""
from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch.distributed function -> (kind, the argument whose bytes this rank contributes)
KINDS = {"all_reduce": ("all_reduce", "tensor"), "reduce": ("reduce", "tensor"),
         "reduce_scatter": ("reduce_scatter", "input_list"), "reduce_scatter_tensor": ("reduce_scatter", "input"),
         "all_gather": ("all_gather", "tensor"), "all_gather_into_tensor": ("all_gather", "input_tensor"),
         "all_to_all_single": ("all_to_all", "input"), "all_to_all": ("all_to_all", "input_tensor_list"),
         "broadcast": ("broadcast", "tensor")}
# (isend itself is not wrapped: P2POp checks it is torch's own function; batch_isend_irecv is, below)


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveCounter:
    """Wraps torch.distributed's collectives (DeepSpeed's pass through them too, with keyword arguments):
    per kind, the bytes this rank contributes (a reduction's input, a gather's own shard, what it sends
    in an all-to-all or a pipeline send, a broadcast's tensor). On a ring, the bytes on the wire per rank are
    2(N-1)/N of an all-reduce's payload, (N-1)/N of a reduce-scatter's and (N-1) times a gather's."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self._orig = {}

    def __enter__(self):
        for name, (kind, arg) in KINDS.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._orig[name] = fn
            signature = inspect.signature(fn)

            @functools.wraps(fn)
            def wrapped(*args, _fn=fn, _kind=kind, _arg=arg, _sig=signature, **kwargs):
                payload = _sig.bind(*args, **kwargs).arguments[_arg]
                self.bytes[_kind] = self.bytes.get(_kind, 0) + _nbytes(payload)
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        batch = self._orig["batch_isend_irecv"] = dist.batch_isend_irecv

        @functools.wraps(batch)
        def batched(ops):   # the pipeline's point-to-point transfers: what this rank sends
            sent = sum(_nbytes(op.tensor) for op in ops if op.op in (dist.isend, dist.send))
            self.bytes["p2p"] = self.bytes.get("p2p", 0) + sent
            return batch(ops)

        dist.batch_isend_irecv = batched
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def take(self) -> dict[str, int]:
        out, self.bytes = self.bytes, {}
        return out


def _worker(rank: int, world: int, port: int, case: dict, steps: int, out_dir: str) -> None:
    import datetime

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    from dsv3.model.step_aux import StepAux
    from dsv3.parallel.mesh import Env
    from dsv3.parallel.plan import build_plan
    from dsv3.train.memory import PeakMemory
    from dsv3.train.trainer import build_model

    cfg = case["cfg"]
    env = Env(rank, world, rank, torch.device("cpu"))
    with CollectiveCounter() as counter:
        model = build_model(cfg, env.device)
        plan = build_plan(model, cfg, env)
        plan.build_optimizer(cfg.optim)
        t = cfg.train
        n_micro = t.global_batch_size // (t.micro_batch_size * plan.dp)
        aux = StepAux(balance_coeff=t.balance_loss_alpha / n_micro)
        gen = torch.Generator().manual_seed(rank)

        def micro_batch(j):
            tok = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
            return tok[:, :-1], tok[:, 1:], None

        import contextlib

        times, traffic, peaks = [], [], []
        for step in range(steps):
            counter.take()
            dist.barrier()
            start = time.perf_counter()
            with PeakMemory("cpu") as mem:
                plan.train_step(micro_batch, n_micro, 0.3, aux, contextlib.nullcontext())
                plan.reduce_and_clip(1.0)
                plan.optimizer_step(1e-4)
            times.append(time.perf_counter() - start)
            traffic.append(counter.take())
            peaks.append(mem.peak_bytes - mem.start_bytes)
    row = {"rank": rank, "step_s": times[1:], "bytes": traffic[-1], "peak_step_bytes": max(peaks[1:]),
           "optim_state_bytes": plan.optimizer_state_bytes(),
           "master_weight_bytes": (sum(x.numel() * x.element_size() for x in plan.zero.master_tensors())
                                   if plan.zero is not None else 0),
           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "tokens_per_step": t.global_batch_size * cfg.data.seq_len}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def run_case(case: dict, steps: int, tmp: str) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    mp.start_processes(_worker, args=(4, port, case, steps, tmp), nprocs=4, start_method="spawn")
    return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(4)]


def make_config(plan: str, option: str):
    from hydra import compose, initialize_config_dir

    overrides = ["+experiment=moe_small", "train.device=cpu", "train.global_batch_size=16", "train.micro_batch_size=2",
                 "data.seq_len=128", "checkpoint.dir=/tmp/unused"]
    overrides += {"dp4": [], "dp4_ep2": ["parallel.ep=2", "parallel.overlap=false"],
                  "pp2_dp2": ["parallel.pp=2", "parallel.pp_schedule=1f1b", "train.micro_batch_size=1"]}[plan]
    overrides += {"plain": [], "zero1": ["parallel.zero=1"], "zero2": ["parallel.zero=2"],
                  "zero1_offload": ["parallel.zero=1", "parallel.offload_optimizer=true"],
                  "plain_ckpt_full": ["train.activation_checkpointing=full"]}[option]
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    from dsv3.config.store import register, to_config

    register()
    with initialize_config_dir(config_dir=root, version_base=None):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    from dsv3.config.validate import validate

    validate(cfg, world_size=4)   # what the trainer would refuse is not measured
    return cfg


def optimizer_step_times(repeats: int) -> dict:
    """The step alone on moe_small's parameters: the old per-parameter loop (one `.item()` host sync
    per parameter) and the foreach AdamW, on identical copies (their updates agree bit for bit)."""
    from dsv3.model import Transformer, init_weights
    from dsv3.train.optim import AdamW, parameter_groups

    cfg = make_config("dp4", "plain")
    model = Transformer(cfg.model)
    init_weights(model, seed=0, std=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    class OldLoop(AdamW):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["step"] += 1
                    t = state["step"].item()
                    g = p.grad.float()
                    m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                    v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                    p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))

    out = {"n_params": sum(p.numel() for p in model.parameters()), "n_tensors": len(list(model.parameters()))}
    optimizers = {}
    for name, cls in (("old_loop", OldLoop), ("foreach", AdamW)):
        m = copy.deepcopy(model)
        for p, q in zip(m.parameters(), model.parameters()):
            p.grad = q.grad.clone()
        optimizers[name] = cls(parameter_groups(m, 0.1), lr=1e-4, betas=(0.9, 0.95))
        optimizers[name].step()   # creates the state
    # alternating, so that a busy machine slows both alike; the median of each
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        out[f"{name}_s"] = sorted(ts)[len(ts) // 2]
        out[f"{name}_min_s"] = min(ts)
    out["speedup"] = out["old_loop_s"] / out["foreach_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20, help="optimizer steps timed per optimizer")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "docs", "zero_memory.json"))
    ap.add_argument("--plans", default="dp4,dp4_ep2,pp2_dp2")
    ap.add_argument("--options", default="plain,zero1,zero2,zero1_offload,plain_ckpt_full")
    a = ap.parse_args()
    import tempfile

    results = {"optimizer_step": optimizer_step_times(a.repeats), "runs": []}
    print(f"optimizer step on {results['optimizer_step']['n_tensors']} tensors: old loop "
          f"{1e3 * results['optimizer_step']['old_loop_s']:.1f} ms, foreach {1e3 * results['optimizer_step']['foreach_s']:.1f} ms",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for plan in filter(None, a.plans.split(",")):
            for option in a.options.split(","):
                if plan == "pp2_dp2" and option == "zero2":
                    continue   # refused: ZeRO-2 with pipeline parallelism
                rows = run_case({"cfg": make_config(plan, option)}, a.steps, tmp)
                step_s = max(sum(r["step_s"]) / len(r["step_s"]) for r in rows)
                rec = {"plan": plan, "option": option, "tokens_per_s": rows[0]["tokens_per_step"] / step_s,
                       "per_rank": rows}
                results["runs"].append(rec)
                print(f"{plan:8s} {option:16s} {rec['tokens_per_s']:7.0f} tok/s | optim state/rank "
                      f"{[r['optim_state_bytes'] >> 10 for r in rows]} KiB | master {rows[0]['master_weight_bytes'] >> 10} KiB"
                      f" | peak/step {[r['peak_step_bytes'] >> 20 for r in rows]} MiB | bytes rank0 "
                      f"{ {k: v >> 10 for k, v in rows[0]['bytes'].items()} } KiB", flush=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
