"""Inputs shared by the csrc/ kernel tests: random top-k routings and never-zero random rows."""
import torch


def routing(n_tokens: int, k: int, n_experts: int, seed: int, masked: float = 0.0,
            experts: list[int] | None = None) -> torch.Tensor:
    """topk_idx [T, K]: distinct experts per token drawn from `experts` (default all), a fraction
    `masked` of the slots set to -1."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(n_experts))
    topk = pool[torch.rand(n_tokens, len(pool), generator=g).topk(k, dim=1).indices]
    if masked:
        topk[torch.rand(n_tokens, k, generator=g) < masked] = -1
    return topk


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Normal values, never exactly zero (a zero would hide a missing write)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return torch.where(x == 0, torch.ones_like(x), x).to(dtype)
