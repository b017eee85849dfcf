"""Run a `Schedule` for real: stage modules, torch.distributed P2P, B/W split from autograd.

What a stage module must do (the `Stage` contract):
- `module(x)` takes the previous stage's activation, a tensor of the fixed shape `act_shape` and
  dtype `act_dtype` given to the executor (the first stage takes the micro-batch input instead,
  anything the module accepts, e.g. token ids), and returns the activation for the next stage,
  a tensor of that same shape and dtype;
- it may instead return `(activation, aux_loss)`: a scalar added to the training loss whose
  gradient is started from this stage (e.g. MoE balance losses), scaled like the main loss;
- the last stage also has `loss_fn(output, target) -> scalar`, the *mean* loss of one
  micro-batch. The executor scales every micro-batch's loss (and aux loss) by 1/m, so with equal
  micro-batch sizes the gradients are those of the mean loss of the whole batch. `target` is
  whatever the caller passes (e.g. a dict of labels and MTP tokens); `loss_fn` may be an
  `nn.Module` with parameters (e.g. output head + MTP, which need those tokens): its parameters
  then belong to the stage like the module's.

Communication: each batch of consecutive SEND/RECV instructions is one `batch_isend_irecv`. A
receive is waited for just before the chunk that needs it; sends are waited for at the end of the
step (their tensors are kept alive until then). That is the dataflow the simulator models; the
schedules are also proven free of deadlock if a batch had to complete before the rank went on
(`check_blocking_comms`). Every message has its own tag, so gloo cannot mix them up, and their
order between two ranks is the same on both sides, as NCCL (which ignores tags) needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .backward_split import WeightGradJob, backward_full, backward_input
from .schedule import Instr, Op, Schedule, comm_batches, message_tag


@dataclass
class Stage:
    """One model stage held by this rank.

    Attributes:
        index: the stage's position 0..S-1 in the model (S = `Schedule.n_stages`).
        module: runs the stage, see the module docstring for inputs and outputs.
        loss_fn: (output, target) -> mean loss of one micro-batch; required on the last stage,
            must be None elsewhere.
        carry: what the stage's chunks hand to its later chunks besides the pipeline's activations
            (`ChunkCarry`, e.g. Seq1F1B's keys and values); None: nothing.
        recomputes: the module recomputes parts of its forward in the backward (activation
            checkpointing). Its I then runs the whole backward and its W nothing: split, each
            weight-gradient call of W would recompute the checkpointed modules again and keep what
            it does not read until the chunk is done (measured: 5x the activations of no
            checkpointing with whole blocks recomputed under ZB1P).
    """

    index: int
    module: nn.Module
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    carry: "ChunkCarry | None" = None
    recomputes: bool = False


class ChunkCarry:
    """Tensors one chunk of a stage hands to later chunks of the same stage, other than through the
    pipeline: Seq1F1B's keys and values of a sequence's earlier segments (dsv3.parallel.seq1f1b).
    The later chunks read detached copies; the gradients they leave there must enter the earlier
    chunk's backward, so the schedule must run the later chunks' backward first."""

    def begin(self, mb: int) -> None:
        """Before the forward of micro-batch `mb`."""

    def end(self, mb: int) -> list[torch.Tensor]:
        """After it: the tensors of its graph that later chunks read (extra roots of its backward)."""
        return []

    def grads(self, mb: int) -> list[torch.Tensor | None]:
        """Before its backward: the gradients the later chunks left for those tensors (None: unused)."""
        return []

    def begin_backward(self, mb: int) -> None:
        """Its backward starts: activation checkpointing may run its forward's modules again in it."""

    def release(self, mb: int) -> None:
        """After its backward."""


@dataclass
class ForwardTask:
    """The forward half of an overlapped F&B pair; `run()` executes it."""

    stage: Stage
    mb: int
    input: Any
    run: Callable[[], None]


@dataclass
class BackwardTask:
    """The backward half of an overlapped F&B pair; `run()` executes it.

    `outputs`/`grads` are the tensors the backward starts from (activation and incoming gradient,
    or the scaled loss), `input` the stage input whose gradient it produces.
    """

    stage: Stage
    mb: int
    outputs: list[torch.Tensor]
    grads: list[torch.Tensor]
    input: Any
    run: Callable[[], None]


OverlapHook = Callable[[ForwardTask, BackwardTask], None]


def sequential_overlap(fwd: ForwardTask, bwd: BackwardTask) -> None:
    """The default F&B hook: forward, then backward. `dsv3.parallel.overlap.Communicator.run_pair`
    interleaves the two instead, so that one's expert-parallel all-to-alls hide behind the
    other's computation (DualPipe's `overlapped_forward_backward`); any order gives the same numbers."""
    fwd.run()
    bwd.run()


@dataclass
class StepResult:
    """What one `step()` produced on this rank.

    losses: unscaled loss of each micro-batch whose last stage ran here (mb -> 0-d tensor).
    aux_losses: unscaled aux losses returned by stages here, summed per micro-batch.
    timeline: (instruction, start, end) in seconds from the step's start, for every compute
        instruction; `idle` = step time - busy time.
    t0: `time.perf_counter()` at the step's start (CLOCK_MONOTONIC on Linux, so ranks on one
        host can be put on one time axis); wall: the step's duration on this rank.
    """

    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[int, torch.Tensor] = field(default_factory=dict)
    timeline: list[tuple[Instr, float, float]] = field(default_factory=list)
    t0: float = 0.0
    wall: float = 0.0

    @property
    def busy(self) -> float:
        return sum(end - start for _, start, end in self.timeline)


@dataclass
class _Chunk:
    """State of one (stage, micro-batch) between its forward and its backward."""

    input: Any
    outputs: list[torch.Tensor]      # activation (if not last) / loss (if last), then aux loss, then carried
    job: WeightGradJob | None = None
    carried: int = 0                 # how many of the outputs the stage's ChunkCarry handed on


class PipelineExecutor:
    """Executes this rank's instruction list of `schedule` with its `stages`.

    Args:
        schedule: from `build_schedule`; all ranks must use the same one.
        stages: the `Stage`s this rank holds, exactly `schedule.stages_on_rank(rank)`.
        rank: this rank's pipeline rank (default: its rank in `group`).
        act_shape, act_dtype: shape and dtype of every activation passed between stages (and of
            its gradient); receives are preallocated from them.
        group: the pipeline process group (default: the world); pipeline rank i is group rank i.
        device: where received tensors are allocated (default: the first stage's parameters').
        overlap: the hook that runs an F&B pair (default `sequential_overlap`).
    """

    def __init__(self, schedule: Schedule, stages: Sequence[Stage], *,
                 act_shape: Sequence[int], act_dtype: torch.dtype = torch.float32,
                 rank: int | None = None, group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, overlap: OverlapHook | None = None):
        self.schedule = schedule
        self.group = group
        self.rank = dist.get_rank(group) if rank is None else rank
        if dist.is_initialized() and dist.get_world_size(group) != schedule.pp:
            raise ValueError(f"schedule {schedule.name!r} is for pp={schedule.pp} ranks but the "
                             f"process group has {dist.get_world_size(group)}")
        want = schedule.stages_on_rank(self.rank)
        got = sorted(s.index for s in stages)
        if got != want:
            raise ValueError(f"rank {self.rank} of schedule {schedule.name!r} must hold stages "
                             f"{want}, got {got}")
        last = schedule.n_stages - 1
        for s in stages:
            if (s.loss_fn is None) == (s.index == last):
                raise ValueError(f"stage {s.index}: loss_fn is required on the last stage "
                                 f"({last}) and only there; got loss_fn={s.loss_fn!r}")
        self.stages = {s.index: s for s in stages}
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        if device is None:
            first = next((p for s in stages for p in s.module.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.overlap = overlap or sequential_overlap
        self._params = {i: [p for p in _stage_params(s) if p.requires_grad]
                        for i, s in self.stages.items()}

    # ----------------------------------------------------------------------------------------
    def step(self, inputs: Sequence[Any] | None = None, targets: Sequence[Any] | None = None
             ) -> StepResult:
        """Run one training step's forward and backward over all m micro-batches.

        `inputs[mb]` is needed on ranks that run stage 0 of micro-batch mb, `targets[mb]` on
        ranks that run its last stage (DualPipe: both end ranks); pass None elsewhere. Parameter
        gradients accumulate into `.grad` (zero them before); DualPipe also needs
        `reduce_mirrored_grads()` afterwards.
        """
        self._check_data(inputs, targets)
        self._inputs, self._targets = inputs, targets
        self._chunks: dict[tuple[int, int], _Chunk] = {}
        self._recvs: dict[tuple, tuple[Any, torch.Tensor]] = {}
        self._local: dict[tuple, torch.Tensor] = {}     # tensors between two stages of this rank
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self._t0 = time.perf_counter()
        self._result = StepResult(t0=self._t0)
        for item in comm_batches(self.schedule.ranks[self.rank]):
            if isinstance(item, list):
                self._post(item)
            else:
                self._compute(item)
        for work, _ in self._sends:
            work.wait()
        self._result.wall = time.perf_counter() - self._t0
        left = list(self._chunks)
        if left or self._recvs or self._local:
            raise RuntimeError(f"rank {self.rank}: schedule {self.schedule.name!r} left work "
                               f"undone: chunks {left}, receives {list(self._recvs)}, local "
                               f"tensors {list(self._local)}")
        result, self._result = self._result, None
        return result

    def mean_loss(self, result: StepResult) -> torch.Tensor:
        """The batch's mean loss (mean over micro-batches), the same on every pipeline rank."""
        total = torch.stack([v.float() for v in result.losses.values()]).sum() \
            if result.losses else torch.zeros((), device=self.device)
        total = total.to(self.device).reshape(1)
        dist.all_reduce(total, group=self.group)
        return total[0] / self.schedule.microbatches

    def reduce_mirrored_grads(self) -> None:
        """Sum the gradients of stages held on two ranks (DualPipe's two copies of each stage):
        after it both copies hold the gradient of the whole batch. No-op for other schedules."""
        ops, bufs = [], []
        for idx in sorted(self.stages):
            others = [r for r in self.schedule.ranks_holding(idx) if r != self.rank]
            if not others:
                continue
            (peer,) = others
            params = self._params[idx]
            mine = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in params])
            theirs = torch.empty_like(mine)
            peer_g = self._global(peer)
            ops += [dist.P2POp(dist.isend, mine, peer_g, self.group, tag=idx),
                    dist.P2POp(dist.irecv, theirs, peer_g, self.group, tag=idx)]
            bufs.append((params, mine, theirs))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for params, mine, theirs in bufs:
            total, offset = mine + theirs, 0   # a + b == b + a in floating point: copies agree
            for p in params:
                n = p.numel()
                p.grad = total[offset:offset + n].view_as(p).clone()
                offset += n

    # ----------------------------------------------------------------------------------------
    def _global(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def _check_data(self, inputs, targets) -> None:
        sched, last = self.schedule, self.schedule.n_stages - 1
        for m in range(sched.microbatches):
            if sched.rank_of(0, m) == self.rank and (inputs is None or len(inputs) <= m):
                raise ValueError(f"rank {self.rank} runs stage 0 of micro-batch {m} and needs "
                                 f"inputs[{m}]; got {None if inputs is None else len(inputs)} "
                                 f"inputs for {sched.microbatches} micro-batches")
            if sched.rank_of(last, m) == self.rank and (targets is None or len(targets) <= m):
                raise ValueError(f"rank {self.rank} runs the last stage of micro-batch {m} and "
                                 f"needs targets[{m}]; got "
                                 f"{None if targets is None else len(targets)} targets")

    def _post(self, batch: list[Instr]) -> None:
        ops = []
        for ins in batch:
            tag, peer = message_tag(self.schedule, ins), self._global(ins.peer)
            if ins.op in (Op.RECV_ACT, Op.RECV_GRAD):
                buf = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group, tag=tag))
            else:
                ops.append(dist.P2POp(dist.isend, self._outgoing(ins), peer, self.group, tag=tag))
        # sent tensors must live until their send completes; drop the ones that have
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        works = dist.batch_isend_irecv(ops)
        for ins, work, op in zip(batch, works, ops):
            if ins.op in (Op.RECV_ACT, Op.RECV_GRAD):
                self._recvs[ins.message()] = (work, op.tensor)
            else:
                self._sends.append((work, op.tensor))

    def _outgoing(self, ins: Instr) -> torch.Tensor:
        key = ("out", ins.message())
        tensor = self._local.pop(key, None)
        if tensor is None:
            raise RuntimeError(f"rank {self.rank}: {ins!r} sends a tensor not produced yet")
        return tensor

    def _receive(self, message: tuple, src_rank: int) -> torch.Tensor:
        """The tensor `message` (kind, stage, mb), from a receive or from a local stage."""
        if src_rank == self.rank:
            return self._local.pop(("local", message))
        if message not in self._recvs:
            raise RuntimeError(f"rank {self.rank}: needs {message} but no receive was posted")
        work, buf = self._recvs.pop(message)
        work.wait()
        return buf

    def _produce(self, message: tuple, tensor: torch.Tensor, dst_rank: int) -> None:
        """Hand `tensor` to the next consumer: a local stage, or the send that follows."""
        tensor = tensor.detach()
        if dst_rank == self.rank:
            self._local[("local", message)] = tensor
        else:
            self._local[("out", message)] = tensor.contiguous()

    # ----------------------------------------------------------------------------------------
    def _compute(self, ins: Instr) -> None:
        """Wait for the instruction's inputs (idle time), then run it (busy time, recorded)."""
        if ins.op is Op.FB:
            f, b = ins.pair
            x, grads = self._forward_input(f), self._backward_grads(b)
            chunk = self._chunks[(b.stage, b.mb)]
            done = []

            def run_f():
                self._forward(f, x)
                done.append("F")

            def run_b():
                self._backward(b, grads)
                done.append("B")

            fwd = ForwardTask(self.stages[f.stage], f.mb, x, run_f)
            bwd = BackwardTask(self.stages[b.stage], b.mb, chunk.outputs, grads, chunk.input, run_b)
            run = lambda: self.overlap(fwd, bwd)  # noqa: E731
        elif ins.op is Op.F:
            x = self._forward_input(ins)
            run = lambda: self._forward(ins, x)  # noqa: E731
        elif ins.op in (Op.B, Op.I):
            grads = self._backward_grads(ins)
            run = lambda: self._backward(ins, grads)  # noqa: E731
        elif ins.op is Op.W:
            run = self._chunks.pop((ins.stage, ins.mb)).job.run
        else:
            raise AssertionError(f"not a compute instruction: {ins!r}")
        start = time.perf_counter() - self._t0
        run()
        self._result.timeline.append((ins, start, time.perf_counter() - self._t0))
        if ins.op is Op.FB and sorted(done) != ["B", "F"]:
            raise RuntimeError(f"the overlap hook must run both tasks of {ins!r} exactly once; "
                               f"it ran {done}")

    def _forward_input(self, ins: Instr) -> Any:
        s, m = ins.stage, ins.mb
        if s == 0:
            return self._inputs[m]
        # a leaf of this stage's graph: its .grad is what goes back to the previous stage
        return self._receive(("act", s - 1, m), self.schedule.route(m)[s - 1]).requires_grad_()

    def _forward(self, ins: Instr, x: Any) -> None:
        s, m = ins.stage, ins.mb
        stage, route, last = self.stages[s], self.schedule.route(m), self.schedule.n_stages - 1
        if stage.carry is not None:
            stage.carry.begin(m)
        out = stage.module(x)
        out, aux = out if isinstance(out, tuple) else (out, None)
        if aux is not None:
            self._result.aux_losses[m] = self._result.aux_losses.get(m, 0) + aux.detach()
        if s == last:
            loss = stage.loss_fn(out, self._targets[m])
            if loss.dim() != 0:
                raise ValueError(f"loss_fn of stage {s} must return a scalar, got shape "
                                 f"{tuple(loss.shape)}")
            self._result.losses[m] = loss.detach()
            outputs = [loss]
        else:
            if out.shape != self.act_shape or out.dtype != self.act_dtype:
                raise ValueError(f"stage {s} returned an activation of shape "
                                 f"{tuple(out.shape)} and dtype {out.dtype}; the executor was "
                                 f"built for act_shape={self.act_shape}, "
                                 f"act_dtype={self.act_dtype}")
            self._produce(("act", s, m), out, route[s + 1])
            outputs = [out]
        if aux is not None:
            outputs.append(aux)
        carried = stage.carry.end(m) if stage.carry is not None else []
        self._chunks[(s, m)] = _Chunk(x, outputs + carried, carried=len(carried))

    def _backward_grads(self, ins: Instr) -> list[torch.Tensor]:
        s, m = ins.stage, ins.mb
        chunk = self._chunks[(s, m)]
        outputs = chunk.outputs[:len(chunk.outputs) - chunk.carried]
        carried = self.stages[s].carry.grads(m) if chunk.carried else []
        if len(carried) != chunk.carried:
            raise RuntimeError(f"stage {s}: {chunk.carried} carried tensors of micro-batch {m} but "
                               f"{len(carried)} gradients for them")
        # the loss and aux losses of a micro-batch enter with weight 1/m: the sum over the
        # micro-batches is then the mean over the whole batch
        scaled = [torch.full_like(t, 1.0 / self.schedule.microbatches) for t in outputs]
        if s == self.schedule.n_stages - 1:
            return scaled + carried
        route = self.schedule.route(m)
        return [self._receive(("grad", s + 1, m), route[s + 1])] + scaled[1:] + carried

    def _backward(self, ins: Instr, grads: list[torch.Tensor]) -> None:
        s, m = ins.stage, ins.mb
        chunk = self._chunks[(s, m)]
        inputs = [chunk.input] if isinstance(chunk.input, torch.Tensor) else []
        carry = self.stages[s].carry
        if carry is not None:
            carry.begin_backward(m)
        if ins.op is Op.B:
            in_grads = backward_full(chunk.outputs, grads, inputs)
            del self._chunks[(s, m)]
            if carry is not None:
                carry.release(m)
        elif carry is not None:
            raise RuntimeError(f"stage {s} carries tensors between chunks: its backward must be a full B, "
                               f"not {ins!r}")
        elif self.stages[s].recomputes:          # the whole backward now; its W has nothing left to do
            in_grads = backward_full(chunk.outputs, grads, inputs)
            chunk.outputs, chunk.input, chunk.job = [], None, WeightGradJob([], None)
        else:
            in_grads, chunk.job = backward_input(chunk.outputs, grads, inputs, self._params[s])
            chunk.outputs, chunk.input = [], None    # W holds what it needs through the graph
        if s > 0:
            g = in_grads[0] if in_grads and in_grads[0] is not None else None
            if g is None:
                raise RuntimeError(f"stage {s}: its output does not depend on its input, so "
                                   f"there is no gradient to send back (micro-batch {m})")
            self._produce(("grad", s, m), g, self.schedule.route(m)[s - 1])


def _stage_params(stage: Stage) -> list[torch.Tensor]:
    params = list(stage.module.parameters())
    if isinstance(stage.loss_fn, nn.Module):
        seen = {id(p) for p in params}
        params += [p for p in stage.loss_fn.parameters() if id(p) not in seen]
    return params
