"""The pipeline executor's test subject: a small deterministic toy model (embedding -> MLP blocks -> head)
cut into stages, its non-pipelined reference step, and the workers `tests/pipeline/test_executor.py`
runs with the launcher of tests/parallel/distributed_testing.py (benchmarks/pipeline_bubble.py
measures the same model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline.executor import PipelineExecutor, Stage, sequential_overlap


class ToyBlock(nn.Module):
    """Pre-norm MLP block with a residual, the shape of a transformer layer's FFN half."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ToyStage(nn.Module):
    """A stage: optional embedding, some blocks, optional head; optionally an aux loss
    (aux_weight * mean square of its last hidden state), returned as (activation, aux)."""

    def __init__(self, blocks: list[ToyBlock], embed: nn.Embedding | None = None,
                 head: nn.Sequential | None = None, aux_weight: float = 0.0):
        super().__init__()
        self.embed, self.blocks, self.head = embed, nn.ModuleList(blocks), head
        self.aux_weight = aux_weight

    def forward(self, x: torch.Tensor):
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        aux = self.aux_weight * x.pow(2).mean() if self.aux_weight else None
        if self.head is not None:
            x = self.head(x)
        return x if aux is None else (x, aux)


def toy_model(n_stages: int, layers_per_stage: int = 1, dim: int = 16, vocab: int = 32,
              seed: int = 0, aux_weight: float = 0.0) -> list[ToyStage]:
    """All stages of the toy model, identically initialized in every process for a `seed`."""
    gen = torch.Generator().manual_seed(seed)
    stages = []
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        for s in range(n_stages):
            embed = nn.Embedding(vocab, dim) if s == 0 else None
            blocks = [ToyBlock(dim) for _ in range(layers_per_stage)]
            head = (nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))
                    if s == n_stages - 1 else None)
            stages.append(ToyStage(blocks, embed, head, aux_weight))
    return stages


def toy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def toy_batches(steps: int, microbatches: int, mb_size: int = 2, seq: int = 4, vocab: int = 32,
                seed: int = 1) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per step: (inputs, targets), each a list of m micro-batches of token ids [mb_size, seq]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (microbatches, mb_size, seq + 1), generator=gen)
        out.append((list(tokens[:, :, :-1]), list(tokens[:, :, 1:])))
    return out


def reference_step(stages: list[nn.Module], inputs, targets, loss_fn=toy_loss):
    """The non-pipelined step: micro-batches in order, each loss (+ aux losses) scaled by 1/m,
    gradients accumulated in `.grad`. Returns (losses per micro-batch, per-micro-batch |grad|
    sums per parameter): the latter bounds how far a reordered sum of the micro-batch
    gradients can be from this one."""
    m = len(inputs)
    params = [p for s in stages for p in s.parameters()]
    abs_sum = [torch.zeros_like(p) for p in params]
    losses = []
    for x, t in zip(inputs, targets):
        before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        aux_total = 0.0
        for stage in stages:
            x = stage(x)
            if isinstance(x, tuple):
                x, aux = x
                aux_total = aux_total + aux
        loss = loss_fn(x, t)
        losses.append(loss.detach())
        ((loss + aux_total) / m).backward()
        for a, p, b in zip(abs_sum, params, before):
            if p.grad is not None:
                a += (p.grad - b).abs()
    return losses, abs_sum


def reversed_overlap(fwd, bwd) -> None:
    """An F&B hook that runs the backward first: the result must not depend on the order."""
    bwd.run()
    fwd.run()


def pipeline_train_worker(rank: int, world_size: int, case: dict) -> dict:
    """Train the toy model for `case["steps"]` SGD steps with the pipelined executor and return
    this rank's per-step losses and gradients; rank 0 also returns the non-pipelined reference
    (computed in the same kind of process, so kernels run with the same thread count).

    case keys: schedule, microbatches, steps, and optionally layers_per_stage, aux_weight,
    overlap ("sequential" | "reversed"), lr, dim.
    """
    sched = build_schedule(case["schedule"], world_size, case["microbatches"])
    dim, lps = case.get("dim", 16), case.get("layers_per_stage", 1)
    aux = case.get("aux_weight", 0.0)
    lr, steps, m = case.get("lr", 0.1), case["steps"], case["microbatches"]
    batches = toy_batches(steps, m)
    out: dict = {"losses": [], "grads": [], "overlap_calls": 0}

    if rank == 0:
        ref_model = toy_model(sched.n_stages, lps, dim, aux_weight=aux)
        out["ref_losses"], out["ref_grads"], out["ref_abs"] = [], [], []
        for inputs, targets in batches:
            losses, abs_sum = reference_step(ref_model, inputs, targets)
            params = [(f"{i}.{n}", p) for i, st in enumerate(ref_model)
                      for n, p in st.named_parameters()]
            out["ref_losses"].append(torch.stack(losses))
            out["ref_grads"].append({n: p.grad.clone() for n, p in params})
            out["ref_abs"].append({n: a for (n, _), a in zip(params, abs_sum)})
            _sgd(ref_model, lr)

    full = toy_model(sched.n_stages, lps, dim, aux_weight=aux)
    mine = [Stage(s, full[s], toy_loss if s == sched.n_stages - 1 else None)
            for s in sched.stages_on_rank(rank)]
    hook = {"sequential": sequential_overlap,
            "reversed": reversed_overlap}[case.get("overlap", "sequential")]

    def counting_hook(fwd, bwd):
        out["overlap_calls"] += 1
        hook(fwd, bwd)

    ex = PipelineExecutor(sched, mine, act_shape=(2, 4, dim), overlap=counting_hook)
    for inputs, targets in batches:
        for st in mine:
            st.module.zero_grad(set_to_none=True)
        res = ex.step(inputs, targets)
        ex.reduce_mirrored_grads()
        out["losses"].append({mb: v for mb, v in res.losses.items()})
        out.setdefault("mean_loss", []).append(ex.mean_loss(res))
        out["grads"].append({f"{st.index}.{n}": p.grad.clone()
                             for st in mine for n, p in st.module.named_parameters()})
        _sgd([st.module for st in mine], lr)
    return out


def _sgd(modules, lr: float) -> None:
    with torch.no_grad():
        for mod in modules:
            for p in mod.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
                p.grad = None


def pipeline_cases_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """`pipeline_train_worker` for several cases in one process group (launching costs seconds)."""
    return [pipeline_train_worker(rank, world_size, case) for case in cases]


def deadlock_worker(rank: int, world_size: int) -> None:
    """Both ranks wait to receive first: never finishes (tests the launcher's deadline)."""
    import torch.distributed as dist

    dist.recv(torch.empty(1), src=1 - rank)
