// Decode attention for the rollout engine on x86 CPUs with AVX-512 (built at first use by
// spa_rl/rollout/kernels.py; see docs/performance.md for why a kernel of our own).
//
// Each (row, KV head) pair attends its G query heads (GQA: the heads that share one KV head) to
// its first lens[row] keys, reading each key and value once: scores in fp32 from bf16 K, a
// softmax in fp32, then the fp32 weighted sum of bf16 V, rounded to bf16 at the end. It returns
// the log-sum-exp of the scaled scores too, which the caller needs to merge this part with the
// attention over a shared prompt prefix.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kHeadDim = 64;  // 4 vectors of 16 floats
constexpr int64_t kMaxGroup = 16;

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (exact)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline void store_bf16(uint16_t* p, __m512 x) {  // 16 fp32 -> 16 bf16, round to nearest even
  __m512i u = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

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


#ifdef __AVX512BF16__
// Lane sums of 16 vectors: out[j] = sum of the lanes of v[j], by a transpose-and-add tree (each
// level halves the vectors and doubles the sums each holds): about 3 operations per sum
// instead of the ~9 of one horizontal reduction per vector.
inline __m512 lane_sums16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)  // within 128-bit lanes: 32-bit interleave, add
    a[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)  // 64-bit interleave, add: lane L of b[j] holds v[4j..4j+3]'s partial sums
    b[j] = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[2 * j]), _mm512_castps_pd(a[2 * j + 1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[2 * j]), _mm512_castps_pd(a[2 * j + 1]))));
  for (int j = 0; j < 2; ++j)  // across 128-bit lanes: (0, 2) + (1, 3)
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}
#endif

}  // namespace

// q (N, H, G, 64) bf16 contiguous; k, v (N, H, >= max(lens), 64) bf16 with a contiguous last
// dimension (views of the cache buffers); lens (N,) int64. Returns out (N, H, G, 64) bf16 and
// lse (N, H, G) fp32; a row with no keys gets zeros and lse = -inf.
std::vector<at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16, "decode_attention: q, k, v must be bfloat16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: bad strides");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous(), "decode_attention: lens must be int64");
  const int64_t N = q.size(0), H = q.size(1), G = q.size(2);
  TORCH_CHECK(q.size(3) == kHeadDim && G <= kMaxGroup, "decode_attention: head_dim 64 and at most 16 queries");
  TORCH_CHECK(k.size(0) == N && k.size(1) == H && v.size(0) == N && v.size(1) == H && lens.size(0) == N,
              "decode_attention: shapes disagree");
  const int64_t max_len = N ? lens.max().item<int64_t>() : 0;
  TORCH_CHECK(max_len <= k.size(2) && max_len <= v.size(2), "decode_attention: lens exceed the keys");
  auto out = at::empty({N, H, G, kHeadDim}, q.options());
  auto lse = at::empty({N, H, G}, q.options().dtype(at::kFloat));
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  float* lsep = lse.data_ptr<float>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t ksn = k.stride(0), ksh = k.stride(1), ksl = k.stride(2);
  const int64_t vsn = v.stride(0), vsh = v.stride(1), vsl = v.stride(2);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // (G, padded length): unnormalised weights after the exp
    __m512 acc[kMaxGroup][4];
    float inv_total[kMaxGroup];
#ifndef __AVX512BF16__
    __m512 qv[kMaxGroup][4];
#endif
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / H, h = i % H, L = lp[n];
      uint16_t* oi = op + i * G * kHeadDim;
      if (L <= 0) {
        for (int64_t g = 0; g < G; ++g) {
          for (int c = 0; c < 4; ++c) store_bf16(oi + g * kHeadDim + 16 * c, _mm512_setzero_ps());
          lsep[i * G + g] = -INFINITY;
        }
        continue;
      }
      const int64_t Lp = (L + 15) / 16 * 16;
      scores.assign(G * Lp, -INFINITY);
#ifndef __AVX512BF16__
      for (int64_t g = 0; g < G; ++g)
        for (int c = 0; c < 4; ++c)
          qv[g][c] = _mm512_mul_ps(load_bf16(qp + (i * G + g) * kHeadDim + 16 * c), _mm512_set1_ps(fscale));
#endif
      const uint16_t* kb = kp + n * ksn + h * ksh;
#ifdef __AVX512BF16__
      // bf16 dot products (vdpbf16ps: pairs multiplied exactly, summed in fp32), 16 keys at a
      // time per query, their lane sums by one tree; the scale applies to the sums
      const __m512 scale_v = _mm512_set1_ps(fscale);
      for (int64_t l0 = 0; l0 < L; l0 += 16) {
        const int64_t m = std::min<int64_t>(16, L - l0);
        const __mmask16 valid = m == 16 ? __mmask16(0xffff) : __mmask16((1u << m) - 1);
        for (int64_t g = 0; g < G; ++g) {
          const uint16_t* qg = qp + (i * G + g) * kHeadDim;
          const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qg), q1 = (__m512bh)_mm512_loadu_si512(qg + 32);
          __m512 part[16];
          for (int64_t j = 0; j < 16; ++j) {
            const uint16_t* kr = kb + (l0 + std::min(j, m - 1)) * ksl;  // past the end: the last key again
            part[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(kr)),
                                       q1, (__m512bh)_mm512_loadu_si512(kr + 32));
          }
          _mm512_mask_storeu_ps(scores.data() + g * Lp + l0, valid, _mm512_mul_ps(lane_sums16(part), scale_v));
        }
      }
#else
      for (int64_t l = 0; l < L; ++l) {
        const uint16_t* kr = kb + l * ksl;
        const __m512 k0 = load_bf16(kr), k1 = load_bf16(kr + 16), k2 = load_bf16(kr + 32), k3 = load_bf16(kr + 48);
        for (int64_t g = 0; g < G; ++g) {
          __m512 a = _mm512_mul_ps(qv[g][0], k0);
          a = _mm512_fmadd_ps(qv[g][1], k1, a);
          a = _mm512_fmadd_ps(qv[g][2], k2, a);
          a = _mm512_fmadd_ps(qv[g][3], k3, a);
          scores[g * Lp + l] = _mm512_reduce_add_ps(a);
        }
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * Lp;
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int64_t l = 0; l < Lp; l += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sg + l));
        const float mx = _mm512_reduce_max_ps(m);
        const __m512 mv = _mm512_set1_ps(mx);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t l = 0; l < Lp; l += 16) {
          const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sg + l), mv));
          _mm512_storeu_ps(sg + l, e);
          sum = _mm512_add_ps(sum, e);
        }
        const float total = _mm512_reduce_add_ps(sum);
        inv_total[g] = 1.f / total;  // applied to the weighted sum at the end
        lsep[i * G + g] = mx + std::log(total);
        for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
      }
      const uint16_t* vb = vp + n * vsn + h * vsh;
      for (int64_t l = 0; l < L; ++l) {
        const uint16_t* vr = vb + l * vsl;
        const __m512 v0 = load_bf16(vr), v1 = load_bf16(vr + 16), v2 = load_bf16(vr + 32), v3 = load_bf16(vr + 48);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(scores[g * Lp + l]);
          acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
          acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
          acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
          acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(inv_total[g]);
        for (int c = 0; c < 4; ++c) store_bf16(oi + g * kHeadDim + 16 * c, _mm512_mul_ps(acc[g][c], inv));
      }
    }
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over bf16 K/V (AVX-512)");
}
