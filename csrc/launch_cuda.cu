// The CUDA launcher: the kernel bodies compiled by nvcc, one thread per item with a grid-stride loop.
// Needs neither torch nor a GPU to compile (tests/csrc/test_nvcc_compile.py builds it for sm_80,
// sm_89 and sm_90a and checks ptxas reports no register spills).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "launch.h"

namespace dsv3 {

constexpr int kCudaThreads = 256;
// Enough blocks to fill the largest GPUs several times over; the grid-stride loop does the rest.
constexpr int64_t kCudaMaxBlocks = 8192;

template <class Body>
__global__ void __launch_bounds__(kCudaThreads) run_body(Body body) {
  body(Grid{int64_t(blockIdx.x), int64_t(gridDim.x), int64_t(threadIdx.x), int64_t(blockDim.x)});
}

template <class Body>
void launch_cuda(const Body& body, void* stream) {
  const int64_t n = body.n_items();
  if (n <= 0) return;
  const int64_t blocks = min_i64(ceil_div(n, kCudaThreads), kCudaMaxBlocks);
  run_body<Body><<<unsigned(blocks), kCudaThreads, 0, static_cast<cudaStream_t>(stream)>>>(body);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("dsv3 dispatch kernel launch failed: ") + cudaGetErrorString(err));
}

#define DSV3_INSTANTIATE_CUDA(...) template void launch_cuda<__VA_ARGS__>(const __VA_ARGS__&, void*);
DSV3_FOR_EACH_KERNEL(DSV3_INSTANTIATE_CUDA)
DSV3_FOR_EACH_TRANSPORT_KERNEL(DSV3_INSTANTIATE_CUDA)

}  // namespace dsv3
