"""The EP transport's kernels in one process: rows written through per-row addresses (AddressedRows) land
exactly where the addresses say, with the bytes of the plain-PyTorch twins, and nowhere else; the flags'
signal/wait work, time out with a message, and notice a peer process that exited.

Exact comparisons: the addressed kernels are the same bodies as the local gathers (test_permute.py,
test_combine.py check those against the twins bit for bit); only where the rows go differs.
"""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from dispatch_testing import randn
from dsv3.kernels import dispatch, dispatch_reference

SENTINEL = 0xA5


def destinations(counts: list[int], spare: list[int], row_bytes: int, seed: int):
    """One byte buffer per destination rank, filled with a sentinel, holding `spare[d]` rows before and
    after this sender's rows; returns (buffers, seg_end, dst_row0, base)."""
    g = torch.Generator().manual_seed(seed)
    buffers = [torch.full(((c + 2 * s) * row_bytes + 128,), SENTINEL, dtype=torch.uint8) for c, s in zip(counts, spare)]
    # 128-byte aligned regions, as the transport lays them out.
    base = [((b.data_ptr() + 127) // 128) * 128 for b in buffers]
    dst_row0 = [int(torch.randint(0, s + 1, (1,), generator=g)) for s in spare]
    seg_end = torch.tensor(counts).cumsum(0)
    return buffers, seg_end, torch.tensor(dst_row0), torch.tensor(base)


def placed_rows(buffers, base, dst_row0, counts, row_bytes):
    """The rows each destination got from this sender, as raw bytes [rows, row_bytes], and a check that
    every other byte of the buffers is untouched."""
    out = []
    for b, addr, r0, c in zip(buffers, base.tolist(), dst_row0.tolist(), counts):
        start = addr - b.data_ptr() + r0 * row_bytes
        region = b[start:start + c * row_bytes]
        untouched = torch.cat([b[:start], b[start + c * row_bytes:]])
        assert (untouched == SENTINEL).all(), "a kernel wrote outside its rows"
        out.append(region.view(c, row_bytes))
    return torch.cat(out)


def test_row_addresses_follow_the_segments():
    counts = [3, 0, 5, 1]
    _, seg_end, dst_row0, base = destinations(counts, [4, 2, 0, 7], 24, seed=1)
    got = dispatch.extension().row_addresses(seg_end, dst_row0, base, sum(counts), 24)
    want = [base[d] + (dst_row0[d] + i) * 24 for d, c in enumerate(counts) for i in range(c)]
    assert got.tolist() == [int(w) for w in want]


@pytest.mark.parametrize("dtype,h", [(torch.float32, 300), (torch.bfloat16, 301), (torch.int64, 5),
                                     (torch.float8_e4m3fn, 129), (torch.float16, 2)])
def test_put_rows_copies_the_gathered_rows_into_each_destination(dtype, h):
    counts = [4, 0, 7, 2]
    x = randn(13, h, seed=h).to(dtype)
    src = torch.randint(-1, 13, (sum(counts),), generator=torch.Generator().manual_seed(2))
    row_bytes = h * x.element_size()
    buffers, seg_end, dst_row0, base = destinations(counts, [3, 1, 0, 5], row_bytes, seed=3)
    ext = dispatch.extension()
    ext.put_rows(x, src, ext.row_addresses(seg_end, dst_row0, base, sum(counts), row_bytes))
    want = dispatch_reference.gather_rows(x, src)
    got = placed_rows(buffers, base, dst_row0, counts, row_bytes)
    assert torch.equal(got, want.view(torch.uint8).view(-1, row_bytes))


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16)])
def test_put_rows_scales_and_converts(in_dtype, out_dtype):
    counts = [5, 3]
    x = randn(9, 77, dtype=in_dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    src = torch.randint(-1, 9, (8,), generator=g)
    scale = torch.rand(8, generator=g)
    row_bytes = 77 * torch.empty((), dtype=out_dtype).element_size()
    buffers, seg_end, dst_row0, base = destinations(counts, [2, 2], row_bytes, seed=6)
    ext = dispatch.extension()
    ext.put_rows(x, src, ext.row_addresses(seg_end, dst_row0, base, 8, row_bytes), scale, out_dtype)
    want = dispatch_reference.gather_rows(x, src, scale, out_dtype)
    assert torch.equal(placed_rows(buffers, base, dst_row0, counts, row_bytes), want.view(torch.uint8).view(8, -1))


def test_put_rows_fp8_writes_data_and_scales_to_their_own_places():
    counts, h = [6, 0, 3], 260  # two full 1x128 tiles and a narrow one
    x = randn(11, h, dtype=torch.bfloat16, seed=7) * 3
    src = torch.randint(-1, 11, (9,), generator=torch.Generator().manual_seed(8))
    q_bufs, seg_end, q_row0, q_base = destinations(counts, [1, 1, 2], h, seed=9)
    s_bufs, _, s_row0, s_base = destinations(counts, [3, 0, 1], 3 * 4, seed=10)
    ext = dispatch.extension()
    ext.put_rows_fp8(x, src, ext.row_addresses(seg_end, q_row0, q_base, 9, h),
                     ext.row_addresses(seg_end, s_row0, s_base, 9, 12))
    q, s = dispatch_reference.permute_fp8(x, src)
    assert torch.equal(placed_rows(q_bufs, q_base, q_row0, counts, h), q.view(torch.uint8))
    assert torch.equal(placed_rows(s_bufs, s_base, s_row0, counts, 12), s.view(torch.uint8).view(9, 12))


@pytest.mark.parametrize("weighted", [True, False])
def test_put_reduce_writes_the_combined_rows(weighted):
    counts, h = [2, 5], 40
    y = randn(20, h, seed=11)
    g = torch.Generator().manual_seed(12)
    index = torch.randint(-1, 20, (7, 3), generator=g)
    w = torch.rand(7, 3, generator=g) if weighted else None
    row_bytes = h * 2
    buffers, seg_end, dst_row0, base = destinations(counts, [1, 3], row_bytes, seed=13)
    ext = dispatch.extension()
    ext.put_reduce(y, index, ext.row_addresses(seg_end, dst_row0, base, 7, row_bytes), w, torch.bfloat16)
    want = dispatch_reference.combine(y, index, None, w, torch.bfloat16)
    assert torch.equal(placed_rows(buffers, base, dst_row0, counts, row_bytes), want.view(torch.uint8).view(7, -1))


def test_put_rejects_a_bad_source_row():
    x = randn(4, 8)
    buf = torch.zeros(64)
    address = torch.tensor([buf.data_ptr(), buf.data_ptr() + 32])
    with pytest.raises(RuntimeError, match=r"src_row\[1\] = 9 is not a row of x"):
        dispatch.extension().put_rows(x, torch.tensor([0, 9]), address)


# -- flags --------------------------------------------------------------------------------------------

def flag_words(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    words = torch.full((n * 8,), -1, dtype=torch.int64)  # one 64-byte line per flag, as the transport
    return words, torch.tensor([words.data_ptr() + 64 * i for i in range(n)])


def me(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Liveness entries that name this (live) process for every flag."""
    ext = dispatch.extension()
    return torch.full((n,), os.getpid()), torch.full((n,), ext.process_start_time(os.getpid()))


def test_signal_then_wait_returns_and_flags_hold_the_round():
    ext = dispatch.extension()
    words, flags = flag_words(3)
    ext.signal(flags, 7)
    ext.wait_flags(flags, 7, 1.0, *me(3), "test")
    ext.wait_flags(flags, 5, 1.0, *me(3), "test")  # a later round satisfies an earlier wait
    assert words.view(3, 8)[:, 0].tolist() == [7, 7, 7]


def test_wait_returns_when_another_thread_signals():
    """The wait releases the GIL while it polls, so Python code elsewhere (here: a thread) can signal."""
    ext = dispatch.extension()
    _, flags = flag_words(2)
    ext.signal(flags[:1], 3)
    timer = threading.Timer(0.2, ext.signal, args=(flags[1:], 3))
    timer.start()
    start = time.monotonic()
    ext.wait_flags(flags, 3, 10.0, *me(2), "test")
    assert 0.15 < time.monotonic() - start < 5
    timer.join()


def test_wait_times_out_with_a_message_naming_the_rank():
    ext = dispatch.extension()
    _, flags = flag_words(3)
    ext.signal(flags, 2)
    ext.signal(flags[2:], 1)  # flag 2 lags behind
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"my exchange: rank 2 of the EP group .* did not reach round 2 within 0.3 s "
                                           r"\(its flag holds 1"):
        ext.wait_flags(flags, 2, 0.3, *me(3), "my exchange")
    assert time.monotonic() - start < 3


def test_wait_notices_a_peer_process_that_exited():
    """Long before the timeout: the peer's pid is checked every 20 ms (a dead child not yet reaped, a
    zombie, counts as exited)."""
    ext = dispatch.extension()
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        started = ext.process_start_time(peer.pid)
        assert started > 0
        _, flags = flag_words(2)
        ext.signal(flags[:1], 0)
        pids, starts = me(2)
        pids[1], starts[1] = peer.pid, started
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"rank 1 of the EP group \(pid {peer.pid}\) exited while this rank "
                                               r"waited for it"):
            ext.wait_flags(flags, 0, 60.0, pids, starts, "test")
        assert time.monotonic() - t0 < 5
    finally:
        peer.wait()
