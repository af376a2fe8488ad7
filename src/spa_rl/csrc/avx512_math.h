// bf16 <-> fp32 conversions and exp for the AVX-512 kernels (included by decode_attention.cpp,
// decoder_ops.cpp and training_attention.cpp, which kernels.py builds into one extension).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace {

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (exact)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// The fp32 bits of x with the rounding to bf16 (nearest, even on ties) added: their high 16 bits
// are the bf16 value.
inline __m512i bf16_rounded_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
}

inline __m256i to_bf16(__m512 x) {  // 16 fp32 -> 16 bf16, round to nearest even
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rounded_bits(x), 16));
}

inline void store_bf16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(x));
}

inline __mmask16 first_lanes(int64_t n) {  // the first min(n, 16) lanes
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}

// The first lanes of m only (AVX512BW/VL): lanes outside m read as 0 and are not written.
inline __m512 load_bf16_masked(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline void store_bf16_masked(uint16_t* p, __mmask16 m, __m512 x) { _mm256_mask_storeu_epi16(p, m, to_bf16(x)); }

// exp(x) for x <= 0: 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], 2^f by a degree-6
// Taylor polynomial of e^(f ln 2) (relative error below 1e-7). x below -87 gives exp(-87)
// ~ 1.6e-38 instead of 0 (an error far below fp32 resolution of the sum it enters).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 round_bf16(__m512 x) {  // x rounded to the nearest bf16 (even on ties), kept in fp32
  return _mm512_castsi512_ps(_mm512_and_si512(bf16_rounded_bits(x), _mm512_set1_epi32(int(0xffff0000u))));
}

}  // namespace
