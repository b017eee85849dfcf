// The host launcher: the kernel bodies compiled by g++ and run as an OpenMP loop over blocks, each
// block running its threads one after another. A block covers consecutive items, so each OpenMP
// thread touches a contiguous slice of the output (no false sharing between cores).
#include <omp.h>

#include "launch.h"

namespace dsv3 {

template <class Body>
void launch_host(const Body& body) {
  const int64_t n = body.n_items();
  if (n <= 0) return;
  // About 16 blocks per OpenMP thread balances uneven items (layout chunks, long rows).
  const int64_t n_blocks = min_i64(n, int64_t(omp_get_max_threads()) * 16);
  const int64_t n_threads = ceil_div(n, n_blocks);
#pragma omp parallel for schedule(static) if (n_blocks > 1)
  for (int64_t b = 0; b < n_blocks; ++b)
    for (int64_t t = 0; t < n_threads; ++t) body(Grid{b, n_blocks, t, n_threads});
}

#define DSV3_INSTANTIATE_HOST(...) template void launch_host<__VA_ARGS__>(const __VA_ARGS__&);
DSV3_FOR_EACH_KERNEL(DSV3_INSTANTIATE_HOST)
DSV3_FOR_EACH_TRANSPORT_KERNEL(DSV3_INSTANTIATE_HOST)

}  // namespace dsv3
