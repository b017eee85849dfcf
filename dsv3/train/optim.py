"""AdamW with a choice of moment dtype (DeepSeek-V3 keeps both moments in BF16) and V3's parameter groups."""
import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decays(name: str, p: torch.Tensor) -> bool:
    """Decay the weight matrices; not norms, biases, or the embedding (whose rows a step barely touches)."""
    return p.ndim >= 2 and not name.endswith("embed.weight")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """V3's two groups: the parameters that `decays`, with `weight_decay`, and the others without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter). Moments are stored in `moment_dtype` and updated
    in fp32; with fp32 moments this is the same update as torch.optim.AdamW. Per parameter p, step t:

        m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;  p *= 1 - lr wd
        p -= lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)"""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, as multi-tensor (foreach) kernels: a handful of
        launches per group instead of ~10 per parameter, and no host synchronization (the step counts
        are CPU tensors). The arithmetic is the per-tensor formula above, operation for operation."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_step: dict[float, list[torch.Tensor]] = {}
            for p in group["params"]:
                state = self.state[p]
                if not state:  # for every parameter, so that checkpoints always hold the same keys
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                if p.grad is None:
                    continue
                state["step"] += 1
                # Parameters that missed a step (no gradient then) have their own bias correction.
                by_step.setdefault(state["step"].item(), []).append(p)
            for t, params in by_step.items():
                self._update(params, group, t, beta1, beta2)
        return None

    def _update(self, params: list[torch.Tensor], group: dict, t: float, beta1: float, beta2: float) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        grads = [p.grad.float() for p in params]
        stored_m = [self.state[p]["exp_avg"] for p in params]
        stored_v = [self.state[p]["exp_avg_sq"] for p in params]
        # Moments are updated in fp32 whatever they are stored in (copies only when stored in BF16).
        m = stored_m if self.moment_dtype == torch.float32 else [x.float() for x in stored_m]
        v = stored_v if self.moment_dtype == torch.float32 else [x.float() for x in stored_v]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        if m is not stored_m:
            torch._foreach_copy_(stored_m, m)
            torch._foreach_copy_(stored_v, v)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        denom = torch._foreach_div(v, 1 - beta2 ** t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - beta1 ** t))
