"""FP8 with expert parallelism: the experts compute on the FP8 rows the dispatch received (no second
quantization), with the numbers the single-process FP8 path gives; and `precision=fp8 parallel=ep2`
trains through torchrun like the single process (up to the BF16 combine)."""
import torch
import torch.distributed as dist

from dsv3.fp8.recipe import Fp8Recipe
from dsv3.fp8.swiglu import Fp8Experts
from dsv3.kernels.fp8_format import attached_fp8
from dsv3.model.init import init_weights
from dsv3.model.moe import Experts, LocalTokenDispatcher
from dsv3.parallel.expert_parallel import ExpertParallelDispatcher
from tests.helpers import read_metrics, run_pretrain, run_torchrun
from tests.parallel.distributed_testing import run_workers

N_EXPERTS, DIM, INTER, K = 4, 160, 64, 2


class CountingRecipe(Fp8Recipe):
    """Records the role of every tensor it quantizes."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "roles", [])

    def quantize(self, v, tiling, role):
        self.roles.append(role)
        return super().quantize(v, tiling, role)


def tokens_of(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(9 + 4 * rank, DIM, generator=g)
    idx = torch.rand(x.shape[0], N_EXPERTS, generator=g).topk(K, dim=1).indices
    return x, idx


def fp8_experts(n_local: int, offset: int) -> Fp8Experts:
    experts = Experts(n_local, DIM, INTER)
    experts.expert_offset = offset
    init_weights(experts, seed=3, std=DIM ** -0.5)
    return Fp8Experts(experts, CountingRecipe())


def worker(rank: int, world: int) -> None:
    n_local = N_EXPERTS // world
    ep = ExpertParallelDispatcher(dist.group.WORLD, N_EXPERTS, fp8=True)
    local = fp8_experts(n_local, rank * n_local)
    x, idx = tokens_of(rank)
    rows, offsets, state = ep.dispatch(x, idx)
    attached = attached_fp8(rows)
    assert attached is not None and attached.data.dtype == torch.float8_e4m3fn
    mantissa, _ = torch.frexp(attached.scale)
    assert (mantissa == 0.5).all(), "dispatched scales must be powers of two"
    y = local(rows, offsets)
    assert "expert_in" not in local.recipe.roles, "the experts quantized the dispatched rows again"
    # The same rows quantized by the experts themselves (power-of-two expert_in scales): the same result.
    again = local(rows.detach().clone(), offsets)
    assert "expert_in" in local.recipe.roles
    assert torch.equal(y, again)
    out = ep.combine(y, torch.ones(idx.shape), state)

    # Single process: every rank's tokens, all experts, the local dispatcher (experts quantize x themselves).
    full = fp8_experts(N_EXPERTS, 0)
    dispatcher = LocalTokenDispatcher(N_EXPERTS)
    r_rows, r_offsets, r_state = dispatcher.dispatch(x, idx)
    want = dispatcher.combine(full(r_rows, r_offsets), torch.ones(idx.shape), r_state)
    # Equal but for the BF16 round trip of the expert outputs in the EP combine (2^-9 relative each).
    torch.testing.assert_close(out, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())


def test_ep_experts_compute_on_the_dispatched_fp8_rows():
    run_workers(worker, 2)


def test_precision_fp8_with_ep2_trains_like_one_process(tmp_path):
    """Same global batch, same FP8 numerics; ep=2 only adds the BF16 round trip of the combine (relative
    2^-9 per expert output), which moves the losses of 4 steps by ~1e-4: 2e-3 relative is the band."""
    args = ["+experiment=moe_tiny", "precision=fp8", "train.max_steps=4", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.resume=none", "checkpoint.every=0"]
    ep2, single = str(tmp_path / "ep2"), str(tmp_path / "single")
    r = run_torchrun(2, ep2, *args, "parallel=ep2", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "FP8 recipe: EMULATED on cpu" in r.stdout
    r = run_pretrain(single, *args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(single), read_metrics(ep2)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 2e-3 * x["loss"], (x["step"], x["loss"], y["loss"])
