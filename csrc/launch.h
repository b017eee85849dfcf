// Launchers of the kernel bodies in dispatch_kernels.cuh and transport_kernels.cuh, one per backend,
// instantiated for every type in DSV3_FOR_EACH_KERNEL and DSV3_FOR_EACH_TRANSPORT_KERNEL. Torch-free,
// so launch_cuda.cu compiles with nvcc alone.
#pragma once

#include "transport_kernels.cuh"

namespace dsv3 {

// Runs body over all its items on the host: an OpenMP loop over blocks (the OpenMP thread count,
// which torch.set_num_threads sets, decides only the speed, never the result).
template <class Body>
void launch_host(const Body& body);

// Enqueues body as a CUDA kernel on `stream` (a cudaStream_t); throws std::runtime_error on a
// launch error.
template <class Body>
void launch_cuda(const Body& body, void* stream);

}  // namespace dsv3
