"""Plain-PyTorch twins of every kernel. Slow and obvious on purpose: tests compare the fast paths to these.

Layout shared by all grouped ops ("contiguous expert-major"): the rows of every expert live in one
tensor `x [M, K]`, expert e owning rows `offsets[e-1]:offsets[e]` (`offsets [E]` int32, cumulative
ends, `offsets[-1] == M`, empty experts allowed). Expert weights are 3-D in nn.Linear order
`[E, N, K]` (out features, in features).
"""
import torch
import torch.nn.functional as F


def expert_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) row range of every expert; a host sync, fine for a reference."""
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e].T, one expert at a time."""
    y = x.new_empty(x.shape[0], w.shape[1])
    for e, (a, b) in enumerate(expert_bounds(offsets)):
        y[a:b] = x[a:b] @ w[e].t()
    return y


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [.., 2I] projection whose first half is the gate and second half the up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_swiglu_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Routed experts: down(silu(gate(x)) * up(x)); w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]."""
    return grouped_linear(swiglu(grouped_linear(x, w13, offsets)), w2, offsets)
