// What the torch bindings of the csrc/ kernels share (dispatch_binding.cpp, transport_binding.cpp):
// the choice of launcher by device, error slots, argument checks with messages for users, dtype
// dispatch.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "launch.h"

#ifdef DSV3_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace dsv3 {

constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

template <class Body>
void run(const Body& body, const at::Tensor& like) {
  if (like.is_cpu()) {
    launch_host(body);
    return;
  }
#ifdef DSV3_WITH_CUDA
  if (like.is_cuda()) {
    const c10::cuda::CUDAGuard guard(like.device());
    launch_cuda(body, at::cuda::getCurrentCUDAStream(like.get_device()).stream());
    return;
  }
#endif
  TORCH_CHECK(false, "dsv3._dispatch_ext: tensors on ", like.device(), " are not supported; this build runs on ",
#ifdef DSV3_WITH_CUDA
              "cpu and cuda"
#else
              "cpu only (it was built against a CPU build of torch; reinstall with a CUDA torch and nvcc for cuda)"
#endif
  );
}

inline at::Tensor error_slot(const at::Tensor& like) {
  return at::full({1}, kNoError, like.options().dtype(at::kLong));
}

// Host kernels record the smallest flat position of a bad index; device kernels trap themselves.
inline std::optional<int64_t> first_error(const at::Tensor& slot) {
  if (!slot.is_cpu()) return std::nullopt;
  const int64_t v = slot.item<int64_t>();
  return v == kNoError ? std::nullopt : std::optional<int64_t>(v);
}

inline void check_index(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [rows, hidden], got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                              const char* nb) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", na, " is on ", a.device(), " but ", nb, " is on ", b.device());
}

inline void raise_bad_src(const at::Tensor& slot, const at::Tensor& src, int64_t n_in, const char* op) {
  if (const auto m = first_error(slot))
    TORCH_CHECK(false, op, ": src_row[", *m, "] = ", src[*m].item<int64_t>(),
                " is not a row of x; accepted: 0..", n_in - 1, ", or -1 for a zero row");
}

inline void raise_bad_index(const at::Tensor& slot, const at::Tensor& index, int64_t n_y, const char* op) {
  if (const auto p = first_error(slot)) {
    const int64_t j = index.size(1), t = *p / j, s = *p % j;
    TORCH_CHECK(false, op, ": index[", t, ", ", s, "] = ", index[t][s].item<int64_t>(),
                " is not a row of y; accepted: 0..", n_y - 1, ", or -1 for an unused slot");
  }
}

// Calls f with a value of the storage type of a float dtype the converting kernels accept.
template <class F>
void with_float_type(at::ScalarType st, const char* op, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); return;
    case at::kBFloat16: f(bf16_t{}); return;
    case at::kHalf: f(f16_t{}); return;
    default:
      TORCH_CHECK(false, op, ": ", name, " dtype ", st, " is not supported; accepted: float32, bfloat16, float16");
  }
}

template <class T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <class T>
T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// The rows of a contiguous 2-D tensor as a kernel's output.
inline LocalRows local_rows(at::Tensor& t) {
  return LocalRows{static_cast<char*>(t.data_ptr()), t.size(1) * int64_t(t.element_size())};
}

// The widest copy unit (16, 8, 4, 2 or 1 bytes) that divides the row and every address given.
inline int64_t copy_unit(int64_t row_bytes, uintptr_t addresses) {
  int64_t unit = 16;
  while (unit > 1 && (row_bytes % unit != 0 || addresses % unit != 0)) unit /= 2;
  return unit;
}

// Calls f with a value of the copy unit type of `unit` bytes.
template <class F>
void with_copy_unit(int64_t unit, F&& f) {
  switch (unit) {
    case 16: f(u128_t{}); return;
    case 8: f(uint64_t{}); return;
    case 4: f(uint32_t{}); return;
    case 2: f(uint16_t{}); return;
    default: f(uint8_t{}); return;
  }
}

// The EP transport's ops (transport_binding.cpp), added to the module by the module's init.
void register_transport(pybind11::module_& m);

}  // namespace dsv3

