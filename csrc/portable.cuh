// Code that must mean the same on the host (g++, OpenMP) and the device (nvcc): the function
// qualifier, bit casts, 16-bit float and FP8 E4M3 conversions, and the integer atomics the kernels
// use. Device code uses the hardware intrinsics; the host code is a bit-exact software twin of each
// (round-to-nearest-even everywhere), checked against torch's casts in tests/csrc/test_numerics.py.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#define DSV3_HD __host__ __device__ __forceinline__
#define DSV3_UNROLL _Pragma("unroll")
#else
#include <cmath>
#define DSV3_HD inline
#define DSV3_UNROLL _Pragma("GCC unroll 8")
#endif

namespace dsv3 {

// Storage types: a kernel moves and converts the bits itself, so it needs no torch or CUDA type.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
struct alignas(16) u128_t { uint64_t lo, hi; };  // 16-byte unit for row copies

DSV3_HD int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
DSV3_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

DSV3_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DSV3_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Round to the nearest integer, ties to even (the default rounding mode on both sides).
DSV3_HD float round_even(float f) {
#if defined(__CUDA_ARCH__)
  return rintf(f);
#else
  return std::nearbyint(f);
#endif
}

DSV3_HD float to_float(float v) { return v; }
DSV3_HD float to_float(bf16_t v) { return bits_float(uint32_t(v.bits) << 16); }

DSV3_HD float to_float(f16_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  const float mag = float(mant) * 0x1p-24f;  // zero or subnormal: mant * 2^-24, exact
  return sign ? -mag : mag;
#endif
}

template <class T> DSV3_HD T from_float(float f);

template <> DSV3_HD float from_float<float>(float f) { return f; }

template <> DSV3_HD bf16_t from_float<bf16_t>(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};  // nan, as torch writes it
  u += 0x7fffu + ((u >> 16) & 1u);                               // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}

template <> DSV3_HD f16_t from_float<f16_t>(float f) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                           // normal half (>= 2^-14)
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return f16_t{uint16_t(sign | ((r >> 13) - (112u << 10)))};
  }
  // subnormal half: a multiple of 2^-24; the scaling is exact, the rounding is the only one
  return f16_t{uint16_t(sign | uint16_t(round_even(bits_float(a) * 0x1p24f)))};
#endif
}

// float -> FP8 E4M3 (the "fn" variant: no inf, max 448), round to nearest even, saturating to
// +-448. The kernels only convert values already scaled into [-448, 448], where saturation never
// triggers and the result equals torch's `.to(torch.float8_e4m3fn)`.
DSV3_HD uint8_t float_to_e4m3(float f) {
#if defined(__CUDA_ARCH__)
  return uint8_t(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3));
#else
  const uint32_t u = float_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);  // nan
  if (a > 0x43e00000u) return uint8_t(sign | 0x7eu);  // above 448: saturate
  if (a >= 0x3c800000u) {                             // normal e4m3 (>= 2^-6)
    const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
    return uint8_t(sign | ((r >> 20) - (120u << 3)));
  }
  return uint8_t(sign | uint8_t(round_even(bits_float(a) * 512.0f)));  // subnormal: k * 2^-9
#endif
}

// The smallest power of two s with amax <= 448 * s, amax floored at kAmaxFloor (so that an
// all-zero tile gets a finite scale). Integer arithmetic on the exponent makes it exact:
// amax = m * 2^e with m in [1, 2) and 448 = 1.75 * 2^8, so s = 2^(e-8) if m <= 1.75 else 2^(e-7).
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;
constexpr int kQuantGroup = 128;  // 1x128 activation tiles (DeepSeek-V3 report, FP8 recipe)

DSV3_HD float pow2_scale(float amax) {
  const uint32_t u = float_bits(amax > kAmaxFloor ? amax : kAmaxFloor);
  const int32_t e = int32_t((u >> 23) & 0xffu) - 127;
  const int32_t s = e - 8 + ((u & 0x7fffffu) > 0x600000u ? 1 : 0);
  return bits_float(uint32_t(s + 127) << 23);
}

// Integer atomics. Counts are the only thing the kernels accumulate with atomics: integer addition
// is associative, so the totals do not depend on the order the atomics land in.
DSV3_HD void atomic_add(int64_t* p, int64_t v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
#endif
}

DSV3_HD void atomic_min(int64_t* p, int64_t v) {
#if defined(__CUDA_ARCH__)
  atomicMin(reinterpret_cast<long long*>(p), static_cast<long long>(v));
#else
  int64_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
#endif
}

DSV3_HD int64_t atomic_exchange(int64_t* p, int64_t v) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(
      atomicExch(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v)));
#else
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
#endif
}

// Flags between the ranks of the EP transport (transport_kernels.cuh): a 64-bit word in memory that
// another process (host: POSIX shared memory) or another GPU (CUDA IPC over NVLink/PCIe) also maps.
// store_release: every write this thread has made or observed before it (cumulativity) becomes
// visible to any thread whose load_acquire reads the stored value; load_acquire: no later read of
// this thread is performed before it. System scope on the device, because the other side is another
// GPU or process. On the host these are C++ atomics on a lock-free 8-byte word, which are
// address-free and hence valid across processes mapping the same page.
DSV3_HD void store_release(int64_t* p, int64_t v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#else
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

DSV3_HD int64_t load_acquire(const int64_t* p) {
#if defined(__CUDA_ARCH__)
  int64_t v;
  asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

// A kernel that meets an index outside its contract: on the host it records the smallest flat
// position of such an index, and the binding raises a Python error naming it. A device kernel cannot
// raise without a host sync, so it prints the same facts and traps, like torch's device-side asserts.
DSV3_HD void report_bad_index(int64_t* first_bad, int64_t position, int64_t value, const char* op) {
#if defined(__CUDA_ARCH__)
  printf("dsv3 %s: invalid index %lld at flat position %lld\n", op, static_cast<long long>(value),
         static_cast<long long>(position));
  __trap();
#else
  (void)value;
  (void)op;
  atomic_min(first_bad, position);
#endif
}

}  // namespace dsv3
