// Philox4x32-10, bit-identical to fusenn.reference.philox and kernels/philox.py.
// Element i of a mask drawn with (seed, offset) uses counter (lo32(offset+i), hi32(offset+i), 0, 0),
// key (lo32(seed), hi32(seed)); it is kept iff (first output word >> 8) >= threshold.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FUSENN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)  // the CPU loops too: a call per element would keep every step scalar and serial
#define FUSENN_HD inline __attribute__((always_inline))
#else
#define FUSENN_HD inline
#endif

// Host loops written for the compiler to vectorise are also built for AVX2 and AVX-512 (x86-64-v4, GCC), chosen at
// load where the CPU has them (x86-64 Linux; built with -ffp-contract=off, so every version computes the same bits).
// AVX-512 runs zoneout's Philox 2.6x faster than AVX2 on this project's CPU (AMD Zen 5).
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define FUSENN_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define FUSENN_HAS_V4_CLONES 1
#elif !defined(__CUDACC__) && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define FUSENN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FUSENN_VECTOR_CLONES
#endif

namespace fusenn {

FUSENN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Philox4 {
  uint32_t x, y, z, w;
};

FUSENN_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

FUSENN_HD uint32_t philox_uint32(uint64_t counter, uint64_t seed) {
  const Philox4 c{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u};
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)).x;
}

FUSENN_HD bool philox_keep(uint64_t counter, uint64_t seed, uint32_t threshold) {
  return (philox_uint32(counter, seed) >> 8) >= threshold;
}

// keep[i] := philox_keep(first + i, seed, threshold) for i < n on the host, vectorised and split over torch's
// threads (csrc/bindings.cpp): dropout's masks and zoneout's on CPU tensors.
void philox_keep_host(uint8_t* keep, uint64_t first, int64_t n, uint64_t seed, uint32_t threshold);

}  // namespace fusenn
