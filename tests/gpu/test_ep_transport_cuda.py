"""The EP transport on a GPU: its kernels (rows written through per-row addresses, the release/acquire
flags) equal the host build, and the direct transport between two processes sharing one GPU (CUDA IPC
handles opened by the peer process) dispatches and combines like the host transport.

Row movement and FP8 quantization are bit-identical (the same bodies, no arithmetic that nvcc could
contract); the weighted sums of combine and of the weight gradient may differ by an FMA contraction
(tests/gpu/test_csrc_cuda.py): 1e-6 relative there.
"""
import os

import pytest
import torch
import torch.distributed as dist
from conftest import DEVICE
from dispatch_testing import randn

from dsv3.kernels import dispatch
from tests.parallel.distributed_testing import run_ranks


def _targets(counts: list[int], row_bytes: int, device: torch.device):
    """A byte buffer per destination on `device` and the row addresses of a sender's segments in them."""
    buffers = [torch.zeros(c * row_bytes + 256, dtype=torch.uint8, device=device) for c in counts]
    base = torch.tensor([(b.data_ptr() + 127) // 128 * 128 for b in buffers], device=device)
    seg_end = torch.tensor(counts, device=device).cumsum(0)
    dst_row0 = torch.zeros(len(counts), dtype=torch.int64, device=device)
    address = dispatch.extension().row_addresses(seg_end, dst_row0, base, sum(counts), row_bytes)
    return buffers, address


def _bytes(buffers) -> torch.Tensor:
    return torch.cat([b.cpu() for b in buffers])


@pytest.mark.parametrize("h", [7, 300, 7168])
def test_addressed_puts_equal_the_host_build(h):
    ext, counts = dispatch.extension(), [37, 0, 101, 5]
    n = sum(counts)
    x = (randn(64, h, seed=h) * 4).to(torch.bfloat16)
    src = torch.randint(-1, 64, (n,), generator=torch.Generator().manual_seed(h))
    index = torch.randint(-1, 64, (n, 2), generator=torch.Generator().manual_seed(h + 1))
    got = {}
    for device in (DEVICE, torch.device("cpu")):
        copy, a = _targets(counts, 2 * h, device)
        ext.put_rows(x.to(device), src.to(device), a)
        q, aq = _targets(counts, h, device)
        s, as_ = _targets(counts, 4 * -(-h // 128), device)
        ext.put_rows_fp8(x.to(device), src.to(device), aq, as_)
        red, ar = _targets(counts, 4 * h, device)
        ext.put_reduce(x.to(device), index.to(device), ar, None, torch.float32)
        got[device.type] = [_bytes(copy), _bytes(q), _bytes(s), _bytes(red)]
    dev, host = got[DEVICE.type], got["cpu"]
    for name, a, b in zip(("copy", "fp8 data", "fp8 scales", "reduce"), dev, host):
        assert torch.equal(a, b), f"{name}: the GPU wrote other bytes than the host build"


def test_flags_signal_and_wait_on_the_device():
    ext = dispatch.extension()
    words = torch.full((3 * 8,), -1, dtype=torch.int64, device=DEVICE)
    flags = torch.tensor([words.data_ptr() + 64 * i for i in range(3)], device=DEVICE)
    pids = torch.full((3,), os.getpid())
    starts = torch.full((3,), ext.process_start_time(os.getpid()))
    ext.signal(flags, 4)
    ext.wait_flags(flags, 4, 10.0, pids, starts, "test")  # a kernel on the device; returns at once there
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert words.view(3, 8)[:, 0].tolist() == [4, 4, 4]


def _ipc_worker(rank: int, world: int, device: str) -> int:
    from dsv3.parallel.ep_transport import DirectTransport
    from dsv3.parallel.expert_parallel import ExpertParallelDispatcher

    dev, cpu, group = torch.device(device), torch.device("cpu"), dist.group.WORLD
    transports = {"device": DirectTransport(group, dev, timeout_s=60),
                  "host": DirectTransport(group, cpu, timeout_s=60)}
    g = torch.Generator().manual_seed(rank)
    n_experts, checked = 8, 0
    for fp8 in (False, True):
        x = torch.randn(33 + 20 * rank, 300, generator=g)
        idx = torch.rand(x.shape[0], n_experts, generator=g).topk(3, dim=1).indices
        w, grad = torch.rand(x.shape[0], 3, generator=g), torch.randn(x.shape[0], 300, generator=g)
        got = {}
        for name, tr in transports.items():
            d = tr.device
            disp = ExpertParallelDispatcher(group, n_experts, align=16, fp8=fp8, transport=tr)
            xx, ww = x.to(d).requires_grad_(), w.to(d).requires_grad_()
            rows, offsets, state = disp.dispatch(xx, idx.to(d))
            out = disp.combine(rows * 1.5, ww, state)  # stand-in experts: an exact product
            out.backward(grad.to(d))
            got[name] = [t.detach().cpu() for t in (rows, offsets, xx.grad, out, ww.grad)]
        for i, (a, b) in enumerate(zip(got["device"], got["host"])):
            if i < 3:  # rows, offsets, token gradient: row movement only
                assert torch.equal(a, b), f"rank {rank} fp8={fp8}: tensor {i} differs"
            else:      # weighted sums: FMA contraction on the device
                assert (a - b).abs().max() <= 1e-6 * b.abs().max() * 300 ** 0.5, f"rank {rank} fp8={fp8}: tensor {i}"
        checked += 1
    for tr in transports.values():
        tr.close()
    return checked


def test_direct_transport_between_two_processes_on_one_gpu_matches_the_host_transport():
    """Two ranks share the GPU: each maps the other's receive buffers through CUDA IPC and the kernels
    signal and wait on flags in GPU memory (the host transport: shared memory, host flags)."""
    assert run_ranks(_ipc_worker, 2, str(DEVICE), timeout=240) == [2, 2]
