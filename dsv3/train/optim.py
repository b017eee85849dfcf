"""AdamW with a choice of moment dtype (DeepSeek-V3 keeps both moments in BF16), V3's parameter groups
and optional layer-wise learning-rate multipliers."""
import re

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_depth(name: str, n_layers: int) -> int:
    """Depth of a parameter for layer-wise learning rates: the embedding 0, layer i (global index) i + 1,
    the final norm, the output head and the MTP modules (which feed the same head) n_layers + 1."""
    if name.startswith("embed."):
        return 0
    match = re.match(r"layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(("norm.", "head.", "mtp.")):
        return n_layers + 1
    raise ValueError(f"parameter {name!r} has no place in the layer-wise learning rates: "
                     "give it a depth in dsv3/train/optim.py:layer_depth")


def decays(name: str, p: torch.Tensor) -> bool:
    """Decay the weight matrices; not norms, biases, or the embedding (whose rows a step barely touches)."""
    return p.ndim >= 2 and not name.endswith("embed.weight")


def parameter_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """V3's two groups: the parameters that `decays`, with `weight_decay`, and the others without.

    With `layer_lr_decay` d != 1 every depth (`layer_depth`) gets its own pair of groups whose
    `lr_scale` is d ** (top - depth): the head and MTP at the full rate, each layer below at d times the
    one above, the embedding lowest. d = 1 is the V3 setting (one rate): the two plain groups."""
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    top = model.cfg.n_layers + 1 if layer_lr_decay != 1.0 else 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = layer_lr_decay ** (top - layer_depth(name, model.cfg.n_layers)) if top else 1.0
        groups.setdefault((scale, decays(name, p)), []).append(p)
    if not top:  # the same two groups (and order) as always, empty or not
        return [{"params": groups.get((1.0, True), []), "weight_decay": weight_decay},
                {"params": groups.get((1.0, False), []), "weight_decay": 0.0}]
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (scale, decayed), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter). Moments are stored in `moment_dtype` and updated
    in fp32; with fp32 moments this is the same update as torch.optim.AdamW. Per parameter p, step t:

        m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;  p *= 1 - lr wd
        p -= lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)"""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.float32):
        self.lr_scales: list[float] = []  # filled by add_param_group, one per group
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    def add_param_group(self, param_group: dict) -> None:
        """A group's rate is `lr` (which the trainer sets for every group alike) times its `lr_scale`. The
        scales stay out of param_groups, hence out of checkpoints: they follow the config, and checkpoints
        of runs with and without layer-wise rates hold the same keys."""
        param_group = dict(param_group)
        self.lr_scales.append(float(param_group.pop("lr_scale", 1.0)))
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, as multi-tensor (foreach) kernels: a handful of
        launches per group instead of ~10 per parameter, and no host synchronization (the step counts
        are CPU tensors). The arithmetic is the per-tensor formula above, operation for operation."""
        for group, lr_scale in zip(self.param_groups, self.lr_scales):
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
                self._update(params, group["lr"] * lr_scale, group, t, beta1, beta2)
        return None

    def _update(self, params: list[torch.Tensor], lr: float, group: dict, t: float, beta1: float,
                beta2: float) -> None:
        wd, eps = group["weight_decay"], group["eps"]
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
