// The intranode EP transport's kernels (dsv3/parallel/ep_transport.py drives them): every rank of an
// EP group maps every other rank's receive buffers (POSIX shared memory between processes on the
// host, CUDA IPC between GPUs), writes its rows straight into them with the row kernels of
// dispatch_kernels.cuh over AddressedRows, and then raises one flag per (source, destination) pair.
//
// Protocol of one exchange n of a group of R ranks (slot k = n mod S of every receive buffer):
//   sender s:   WaitFlags(free[d][k] >= n - S) for every d    the receiver is done with round n - S
//               row kernels: rows for d -> d's slot k          plain stores, at offsets every rank
//                                                              computes from the same count matrix
//               Signal(ready[d][k][s] = n) for every d        release
//   receiver d: WaitFlags(ready[d][k][s] >= n) for every s    acquire
//               consume slot k (kernels reading it)           plain loads
//               Signal(free[d][k] = n)                        release
// Memory ordering: the release store of ready[d][k][s] makes s's row stores visible to d once d's
// acquire load reads n (release/acquire synchronize; a release is cumulative, so the stores of all the
// threads of the row kernel, which happen before the signal, are covered). On the host the row kernel
// is an OpenMP loop whose closing barrier orders every thread's stores before the single signalling
// thread; on the device the signal kernel follows the row kernel on the same stream and fences at
// system scope before its release store. The free flag orders the other way round: d's loads of
// round n - S happen before its release of free, s's stores of round n after its acquire of it, so
// a sender never overwrites rows that are still being read (write-after-read across processes).
// Flags only grow (they hold round numbers), so a waiter that is late sees a larger value and still
// proceeds, and no flag ever needs to be reset.
#pragma once

#include "dispatch_kernels.cuh"

namespace dsv3 {

// Device code: a full fence at system scope (other GPUs and the host), before a signalling store.
DSV3_HD void fence_system() {
#if defined(__CUDA_ARCH__)
  __threadfence_system();
#endif
}

// Where each send row lands. Send rows are grouped by destination rank (rank d's segment ends at
// seg_end[d]); this rank's rows for d start at row dst_row0[d] of d's receive region for the field,
// whose address in this process is base[d].
struct RowAddresses {
  const int64_t* seg_end;   // [n_ranks] cumulative
  const int64_t* dst_row0;  // [n_ranks]
  const int64_t* base;      // [n_ranks] byte addresses
  int64_t n_ranks, n_rows, row_bytes;
  int64_t* address;         // [n_rows] out

  DSV3_HD int64_t n_items() const { return n_rows; }

  DSV3_HD void operator()(Grid g) const {
    for (int64_t m = g.first(); m < n_rows; m += g.stride()) {
      int64_t d = 0;
      while (d < n_ranks - 1 && seg_end[d] <= m) ++d;  // ranks are few: a scan beats a search
      const int64_t begin = d ? seg_end[d - 1] : 0;
      address[m] = base[d] + (dst_row0[d] + m - begin) * row_bytes;
    }
  }
};

// flag[i] = value with release semantics (see the protocol above), one item per flag.
struct Signal {
  const int64_t* flag;  // [n] byte addresses of the flag words
  int64_t n, value;

  DSV3_HD int64_t n_items() const { return n; }

  DSV3_HD void operator()(Grid g) const {
    for (int64_t i = g.first(); i < n; i += g.stride()) {
      fence_system();
      store_release(reinterpret_cast<int64_t*>(flag[i]), value);
    }
  }
};

// Waits until flag[i] >= target for every i (acquire). On the device every item spins (with a
// short sleep) and a flag that stays below target for timeout_ns traps the kernel with a message,
// like a device-side assert: a dead or stalled peer ends the job instead of hanging it. On the host
// the body checks each flag once and records the first one not reached in `missing` (the caller
// fills it with n); the binding loops over it with back-off, a deadline and a check that the peer
// processes are alive, which a kernel cannot do.
struct WaitFlags {
  const int64_t* flag;  // [n] byte addresses of the flag words
  int64_t n, target, timeout_ns;
  int64_t* missing;

  DSV3_HD int64_t n_items() const { return n; }

  DSV3_HD void operator()(Grid g) const {
    for (int64_t i = g.first(); i < n; i += g.stride()) {
      const int64_t* f = reinterpret_cast<const int64_t*>(flag[i]);
#if defined(__CUDA_ARCH__)
      uint64_t start, now;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
      int64_t seen;
      while ((seen = load_acquire(f)) < target) {
        __nanosleep(128);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (int64_t(now - start) > timeout_ns) {
          printf("dsv3 ep transport: flag %lld of %lld stayed at %lld < %lld for %lld ns: a peer rank died or "
                 "stopped exchanging\n",
                 static_cast<long long>(i), static_cast<long long>(n), static_cast<long long>(seen),
                 static_cast<long long>(target), static_cast<long long>(timeout_ns));
          __trap();
        }
      }
#else
      (void)timeout_ns;
      if (load_acquire(f) < target) atomic_min(missing, i);
#endif
    }
  }
};

// The transport's instantiations: the row kernels writing through AddressedRows, and the flags.
#define DSV3_FOR_EACH_TRANSPORT_TYPED(X, T)                                                          \
  X(GatherScaled<T, float, AddressedRows>) X(GatherScaled<T, bf16_t, AddressedRows>)                 \
  X(GatherScaled<T, f16_t, AddressedRows>) X(Combine<T, float, AddressedRows>)                       \
  X(Combine<T, bf16_t, AddressedRows>) X(Combine<T, f16_t, AddressedRows>) X(GatherFp8<T, AddressedRows>)

#define DSV3_FOR_EACH_TRANSPORT_KERNEL(X)                                                            \
  X(RowAddresses) X(Signal) X(WaitFlags)                                                             \
  X(GatherCopy<uint8_t, AddressedRows>) X(GatherCopy<uint16_t, AddressedRows>)                       \
  X(GatherCopy<uint32_t, AddressedRows>) X(GatherCopy<uint64_t, AddressedRows>)                      \
  X(GatherCopy<u128_t, AddressedRows>)                                                               \
  DSV3_FOR_EACH_TRANSPORT_TYPED(X, float) DSV3_FOR_EACH_TRANSPORT_TYPED(X, bf16_t)                   \
  DSV3_FOR_EACH_TRANSPORT_TYPED(X, f16_t)

}  // namespace dsv3
