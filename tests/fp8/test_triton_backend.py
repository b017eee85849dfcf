"""The recipe on the Triton backend (the GPU path), run in Triton's CPU interpreter: Fp8Linear and the
FP8 SwiGLU experts give what the emulation gives.

Triton fixes interpreter vs compiler mode when it is first imported, so the comparison runs in a child
process started with TRITON_INTERPRET=1 (`python tests/fp8/test_triton_backend.py`).

Tolerance (as tests/kernels/test_experts_autograd.py): both sides quantize the same tensors with the same
tiles, but the tensors quantized mid-way (h, d_gate_up, dx's inputs) come out of GEMMs with different
summation orders, so an element on a rounding boundary may land one E4M3 step (2^-3 relative) apart;
spread over sums of >= 64 terms that stays below 2e-3 of the output scale.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_triton_backend_equals_the_emulation_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def _compare() -> None:
    sys.path.insert(0, ROOT)
    import torch
    from torch import nn

    from dsv3.fp8.linear import Fp8Linear
    from dsv3.fp8.recipe import Fp8Recipe, backend_for
    from dsv3.fp8.swiglu import Fp8SwiGLUFunction
    from dsv3.kernels.triton import interpreting

    assert interpreting(), "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    recipes = {impl: Fp8Recipe(backend=backend_for(impl)) for impl in ("triton", "reference")}

    def close(name, a, b):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert a.dtype == b.dtype and a.shape == b.shape and err <= 2e-3 * scale, f"{name}: {err:.3g} vs {scale:.3g}"

    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(160, 96, bias=False)
    linear.weight.data = torch.randn(96, 160, generator=g) * 160 ** -0.5
    x, dy = torch.randn(130, 160, generator=g), torch.randn(130, 96, generator=g)
    results = {}
    for impl, recipe in recipes.items():
        linear.weight.grad = None
        xi = x.clone().requires_grad_()
        y = Fp8Linear(linear, recipe, "attn_out")(xi)
        y.backward(dy)
        results[impl] = (y, xi.grad, linear.weight.grad)
    for name, a, b in zip(("linear y", "linear dx", "linear dw"), results["triton"], results["reference"]):
        close(name, a, b)

    counts = [0, 129, 1, 37]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    E, M, D, inter = len(counts), sum(counts), 160, 64
    x = torch.randn(M, D, generator=g)
    w13 = torch.randn(E, 2 * inter, D, generator=g) * D ** -0.5
    w2 = torch.randn(E, D, inter, generator=g) * inter ** -0.5
    dy = torch.randn(M, D, generator=g)
    for impl, recipe in recipes.items():
        leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
        y = Fp8SwiGLUFunction.apply(*leaves, offsets, recipe, "expert_in", "expert_out_grad", None)
        results[impl] = (y, *torch.autograd.grad(y, leaves, dy))
    for name, a, b in zip(("experts y", "experts dx", "dw13", "dw2"), results["triton"], results["reference"]):
        close(name, a, b)
    print("ok")


if __name__ == "__main__":
    _compare()
