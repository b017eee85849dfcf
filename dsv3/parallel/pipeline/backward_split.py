"""Split a stage's backward into I (input gradients) and W (weight gradients), from autograd.

Zero-bubble schedules run I now (the previous stage waits for it) and W later (it fills a
bubble). DualPipe's reference does this with a `WeightGradStore` that its own Linear layers feed;
that needs the model's cooperation. Here it is done on any module, from the autograd graph:

1. I: find the graph nodes that lie on a path from the stage outputs to the stage inputs (the
   "input path"). A node on that path whose other inputs lead to parameters is an *entry*: the
   weight gradients flow off the input path there (e.g. the AddmmBackward of a Linear, the
   MulBackward of a norm's weight). Hooks record the gradient each entry receives while
   `torch.autograd.grad(outputs, inputs, retain_graph=True)` computes the input gradients; the
   engine computes only the outputs a node needs, so a Linear's dW is not computed here.
2. W: per group of parameters (params sharing entries), `torch.autograd.grad` from the recorded
   gradients at the entries to the parameters, which runs only the parameter side of each entry
   (a Linear's dW GEMM); the input path is not recomputed. The result is added to `param.grad`.

Memory trade-off: I keeps the chunk's autograd graph, and so all its saved activations, alive
until W (`retain_graph=True`); a Linear-only WeightGradStore would keep just each Linear's input
and output gradient. The simulator therefore also reports the peak of chunks alive until W.
Custom `autograd.Function`s on the input path cannot skip an output, so they compute both
gradients during I and again in W: correct, but that op costs double; such Functions should defer
their dW themselves (DualPipe's WeightGradStore pattern). A parameter used at two depths of one
stage (or a loss term of parameters only) makes W recompute the input path between the two.

If no stage input requires a gradient (the first stage: token ids), I has nothing to compute and
W runs the whole backward.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


class WeightGradJob:
    """The deferred W of one chunk: `run()` once, it adds the weight gradients to `.grad`."""

    def __init__(self, groups: list[tuple[list[tuple[Node, tuple]], list[torch.Tensor]]],
                 full: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None):
        self._groups = groups
        self._full = full
        self._done = False

    def run(self) -> None:
        if self._done:
            raise RuntimeError("this W (weight-gradient job) has already run")
        self._done = True
        if self._full is not None:
            outputs, grads, params = self._full
            if params:
                torch.autograd.backward(outputs, grads, inputs=params)
        for entries, params in self._groups:
            _weight_grads(entries, params)
        self._groups, self._full = [], None   # drop the graph: frees the chunk's activations


def backward_full(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """B: one backward pass; parameter gradients accumulate in `.grad`; returns input grads."""
    outs, gs = _roots(outputs, grads)
    if outs:
        torch.autograd.backward(outs, gs)
    return [x.grad if x.requires_grad else None for x in inputs]


def backward_input(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
                   ) -> tuple[list[torch.Tensor | None], WeightGradJob]:
    """I: the gradients of `inputs` (also stored in their `.grad`), and the deferred W.

    `inputs` are leaf tensors the stage ran on; `params` the stage's parameters.
    """
    outs, gs = _roots(outputs, grads)
    params = [p for p in params if p.requires_grad]
    wanted = [x for x in inputs if x.requires_grad]
    if not outs:
        return [None] * len(inputs), WeightGradJob([], None)
    if not wanted:
        return [None] * len(inputs), WeightGradJob([], (outs, gs, params))

    root_edges = [get_gradient_edge(t) for t in outs]
    parents, nodes = _reverse_edges([e.node for e in root_edges])
    input_nodes = {get_gradient_edge(x).node for x in wanted}
    param_of = {get_gradient_edge(p).node: p for p in params}
    on_input_path = _ancestors(input_nodes, parents, nodes)
    leads_to_param = _ancestors(set(param_of), parents, nodes)

    # entries: input-path nodes whose gradient also flows to parameters off the input path
    reach_memo: dict[Node, frozenset] = {}
    entry_params: dict[Node, set] = {}
    for node in on_input_path:
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in on_input_path and nxt in leads_to_param:
                entry_params.setdefault(node, set()).update(
                    _params_reached(nxt, param_of, leads_to_param, reach_memo))
    # outputs that do not depend on the inputs at all (e.g. a loss term of parameters only):
    # their gradient is known now, they become entries of W directly
    direct = [(e, g) for e, g in zip(root_edges, gs)
              if e.node not in on_input_path and e.node in leads_to_param]

    captured: dict[Node, tuple] = {}
    handles = [n.register_prehook(_capture(captured, n)) for n in entry_params]
    try:
        in_grads = torch.autograd.grad(outs, wanted, gs, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for x, g in zip(wanted, in_grads):
        if g is not None:
            x.grad = g if x.grad is None else x.grad + g

    groups = _group(entry_params, captured, direct, param_of, leads_to_param, reach_memo)
    result = iter(in_grads)
    return [next(result) if x.requires_grad else None for x in inputs], WeightGradJob(groups, None)


def _roots(outputs, grads):
    if len(outputs) != len(grads):
        raise ValueError(f"got {len(outputs)} outputs but {len(grads)} gradients")
    pairs = [(t, g) for t, g in zip(outputs, grads) if t.requires_grad and g is not None]
    return [t for t, _ in pairs], [g for _, g in pairs]


def _reverse_edges(roots: list[Node]) -> tuple[dict[Node, list[Node]], set[Node]]:
    """Parents of every node reachable from `roots`, and the set of those nodes."""
    parents: dict[Node, list[Node]] = defaultdict(list)
    seen, stack = set(roots), list(roots)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            parents[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return parents, seen


def _ancestors(targets: set[Node], parents: dict[Node, list[Node]], nodes: set[Node]) -> set[Node]:
    """Nodes of the graph from which some target is reachable (the targets included)."""
    found = {t for t in targets if t in nodes}
    stack = list(found)
    while stack:
        for p in parents.get(stack.pop(), ()):
            if p not in found:
                found.add(p)
                stack.append(p)
    return found


def _params_reached(node, param_of, leads_to_param, memo) -> frozenset:
    if node in memo:
        return memo[node]
    out = {param_of[node]} if node in param_of else set()
    for nxt, _ in node.next_functions:
        if nxt is not None and nxt in leads_to_param:
            out |= _params_reached(nxt, param_of, leads_to_param, memo)
    memo[node] = frozenset(out)
    return memo[node]


def _capture(captured: dict, node: Node):
    def hook(grad_outputs):
        captured[node] = tuple(grad_outputs)
    return hook


def _group(entry_params, captured, direct, param_of, leads_to_param, memo):
    """Parameters reached from a shared entry must be differentiated in one call (else the
    shared part would run twice); other parameters get their own small call."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    sources = [(node, captured.get(node, ()), ps) for node, ps in entry_params.items()]
    sources += [(e, g, _params_reached(e.node, param_of, leads_to_param, memo)) for e, g in direct]
    for _, _, ps in sources:
        ids = [id(p) for p in ps]
        for i in ids[1:]:
            parent[find(i)] = find(ids[0])
    groups: dict[int, tuple[list, dict]] = {}
    for src, grads, ps in sources:
        if ps:
            entries, group_params = groups.setdefault(find(id(next(iter(ps)))), ([], {}))
            entries.append((src, grads))
            group_params.update((id(p), p) for p in ps)
    return [(entries, list(ps.values())) for entries, ps in groups.values()]


def _weight_grads(entries: list[tuple], params: list[torch.Tensor]) -> None:
    edges, grads, clamps = [], [], []
    try:
        for src, saved in entries:
            if isinstance(src, GradientEdge):    # an output that did not depend on the inputs
                edges.append(src)
                grads.append(saved)
                continue
            edges += [GradientEdge(src, i) for i, g in enumerate(saved) if g is not None]
            grads += [g for g in saved if g is not None]
            if len(entries) > 1:
                # one entry may lie below another; the engine would add the upper one's flow to
                # the gradient the lower one already received during I: pin it to that
                clamps.append(src.register_prehook(lambda _, saved=saved: saved))
        if not edges:
            return
        dws = torch.autograd.grad(edges, params, grads, retain_graph=True, allow_unused=True)
    finally:
        for h in clamps:
            h.remove()
    with torch.no_grad():
        for p, dw in zip(params, dws):
            if dw is not None:
                p.grad = dw if p.grad is None else p.grad.add_(dw)
