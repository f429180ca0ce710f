// The counter-based hash of fastsel/rng.py (Wellons' lowbias32), shared by the C++ and
// CUDA code so every backend draws bit-identical uniforms.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTSEL_HD __host__ __device__ __forceinline__
#else
#define FASTSEL_HD inline
#endif

namespace fastsel {

constexpr uint32_t kGolden32 = 0x9E3779B9u;
constexpr int kStreamShuffle = 2;

FASTSEL_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// rng.stream_base: mix32((key & MASK32) ^ mix32((stream * GOLDEN32) & MASK32)).
FASTSEL_HD uint32_t stream_base(int64_t key, int64_t stream) {
  uint32_t s = static_cast<uint32_t>(static_cast<uint64_t>(stream) * kGolden32);
  return mix32(static_cast<uint32_t>(static_cast<uint64_t>(key)) ^ mix32(s));
}

// rng.hash_indices for one index: the int64 index is taken mod 2**32, as `& MASK32` does.
FASTSEL_HD uint32_t hash_index(int64_t idx, uint32_t base) {
  uint32_t h = mix32(static_cast<uint32_t>(static_cast<uint64_t>(idx)) ^ base);
  return mix32(h + base);
}

// rng.uniform: ((h >> 8) as float32 + 0.5f) * 2**-24, each step rounded in float32 as
// torch does (the +0.5 rounds to even above 2**23, so distinct hashes may tie).
FASTSEL_HD float hash_to_uniform(uint32_t h) {
  float f = static_cast<float>(h >> 8);  // exact: 24 bits
  float g = f + 0.5f;
  return g * (1.0f / 16777216.0f);
}

// A float key mapped to a uint32 whose ascending order is ReferenceBackend.select's rank
// order: +inf > finite > -inf > NaN, -0.0 equal to +0.0 (equal keys tie, by index).
FASTSEL_HD uint32_t descending_key(float v) {
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(v);
#else
  __builtin_memcpy(&b, &v, sizeof b);
#endif
  const uint32_t mag = b & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return 0xFFFFFFFFu;  // every NaN, after -inf (which maps to 0xFF800000)
  if (mag == 0u) b = 0u;                       // -0.0 -> +0.0
  const uint32_t asc = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // ascending float order
  return ~asc;
}

}  // namespace fastsel
