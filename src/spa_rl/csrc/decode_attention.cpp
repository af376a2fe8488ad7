// Decode attention for the rollout engine on x86 CPUs with AVX-512 (built at first use by
// spa_rl/kernels.py; see docs/performance.md for why a kernel of our own).
//
// Each (row, KV head) pair attends its G query heads (GQA: the heads that share one KV head) to
// its keys, which are up to two ranges: the row's shared prompt prefix (a "segment" of the
// cache, read by several rows) and its private tokens. Scores in fp32 from bf16 K, one softmax
// in fp32 over both ranges, then the fp32 weighted sum of bf16 V, rounded to bf16 at the end.
// It returns the log-sum-exp of the scaled scores too.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx512_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kHeadDim = 64;  // 4 vectors of 16 floats
constexpr int64_t kMaxGroup = 16;  // queries per work item
constexpr int64_t kQueryBlock = 6;  // queries per pass over V (24 accumulators + 4 values in 32 registers)

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


// One contiguous run of keys and values (a view of a cache buffer) and where its scores sit in
// the scores row (offsets are multiples of 16: each range's last block is padded with -inf).
struct KeyRange {
  const uint16_t* k;
  const uint16_t* v;
  int64_t k_stride, v_stride, len, offset;
};

// out[g] = (sum over the ranges' keys l of w[g * Lp + offset + l] * V[l]) * inv[g] for QB
// queries, rounded to bf16. QB <= 6: 24 accumulators and 4 value vectors fit the 32 registers
// (16 queries at once spilled, and ran slower even for 3).
template <int QB>
inline void weighted_values(const KeyRange* ranges, int n_ranges, const float* w, int64_t Lp, const float* inv,
                            uint16_t* out) {
  __m512 acc[QB][4];
  for (int g = 0; g < QB; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int r = 0; r < n_ranges; ++r) {
    const KeyRange& kr = ranges[r];
    const float* wr = w + kr.offset;
    for (int64_t l = 0; l < kr.len; ++l) {
      const uint16_t* vr = kr.v + l * kr.v_stride;
      const __m512 v0 = load_bf16(vr), v1 = load_bf16(vr + 16), v2 = load_bf16(vr + 32), v3 = load_bf16(vr + 48);
      for (int g = 0; g < QB; ++g) {
        const __m512 p = _mm512_set1_ps(wr[g * Lp + l]);
        acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
      }
    }
  }
  for (int g = 0; g < QB; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    for (int c = 0; c < 4; ++c) store_bf16(out + g * kHeadDim + 16 * c, _mm512_mul_ps(acc[g][c], s));
  }
}

#ifdef __AVX512BF16__
// The same with the weights rounded to bf16 (as the flash kernel rounds its probabilities before
// the product with V) and vdpbf16ps over pairs of keys: each value row pair (l, l + 1) is
// interleaved once per pass and serves QB queries with 4 instructions each, where the fp32
// version takes 4 FMAs per key. The accumulators hold the dimensions in the interleaved order
// (per 128-bit lane, 4 of one unpack then 4 of the other), put back in order at the end.
template <int QB>
inline void weighted_values_bf16(const KeyRange* ranges, int n_ranges, const uint16_t* w, int64_t Lp,
                                 const float* inv, uint16_t* out) {
  __m512 acc[QB][4];
  for (int g = 0; g < QB; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int r = 0; r < n_ranges; ++r) {
    const KeyRange& kr = ranges[r];
    const uint16_t* wr = w + kr.offset;  // offsets and l are even: (w[l], w[l + 1]) is one 32-bit word
    for (int64_t l = 0; l < kr.len; l += 2) {
      const uint16_t* va = kr.v + l * kr.v_stride;
      const __m512i a0 = _mm512_loadu_si512(va), a1 = _mm512_loadu_si512(va + 32);
      __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
      if (l + 1 < kr.len) {  // an odd last key pairs with zeros
        b0 = _mm512_loadu_si512(va + kr.v_stride);
        b1 = _mm512_loadu_si512(va + kr.v_stride + 32);
      }
      const __m512bh p0 = (__m512bh)_mm512_unpacklo_epi16(a0, b0), p1 = (__m512bh)_mm512_unpackhi_epi16(a0, b0);
      const __m512bh p2 = (__m512bh)_mm512_unpacklo_epi16(a1, b1), p3 = (__m512bh)_mm512_unpackhi_epi16(a1, b1);
      for (int g = 0; g < QB; ++g) {
        int32_t pair;
        std::memcpy(&pair, wr + g * Lp + l, sizeof(pair));
        const __m512bh wp = (__m512bh)_mm512_set1_epi32(pair);
        acc[g][0] = _mm512_dpbf16_ps(acc[g][0], wp, p0);
        acc[g][1] = _mm512_dpbf16_ps(acc[g][1], wp, p1);
        acc[g][2] = _mm512_dpbf16_ps(acc[g][2], wp, p2);
        acc[g][3] = _mm512_dpbf16_ps(acc[g][3], wp, p3);
      }
    }
  }
  // lane k of an unpacklo result holds dimensions 8k..8k+3, of the unpackhi result 8k+4..8k+7
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < QB; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    for (int h = 0; h < 2; ++h) {  // dimensions 32h .. 32h + 31
      const __m512 lo = acc[g][2 * h], hi = acc[g][2 * h + 1];
      store_bf16(out + g * kHeadDim + 32 * h, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), s));
      store_bf16(out + g * kHeadDim + 32 * h + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), s));
    }
  }
}
#endif

// Scaled scores of Gn (<= kMaxGroup) queries against one range, into scores[g * Lp + offset + l].
inline void score_range(const uint16_t* q, int64_t Gn, const KeyRange& kr, float scale, float* scores, int64_t Lp) {
  const int64_t L = kr.len;
#ifdef __AVX512BF16__
  // bf16 dot products (vdpbf16ps: pairs multiplied exactly, summed in fp32), 16 keys at a time
  // per query, their lane sums by one tree; the scale applies to the sums
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t l0 = 0; l0 < L; l0 += 16) {
    const int64_t m = std::min<int64_t>(16, L - l0);
    const __mmask16 valid = first_lanes(m);
    for (int64_t g = 0; g < Gn; ++g) {
      const uint16_t* qg = q + g * kHeadDim;
      const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qg), q1 = (__m512bh)_mm512_loadu_si512(qg + 32);
      __m512 part[16];
      for (int64_t j = 0; j < 16; ++j) {
        const uint16_t* key = kr.k + (l0 + std::min(j, m - 1)) * kr.k_stride;  // past the end: the last key again
        part[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(key)),
                                   q1, (__m512bh)_mm512_loadu_si512(key + 32));
      }
      _mm512_mask_storeu_ps(scores + g * Lp + kr.offset + l0, valid, _mm512_mul_ps(lane_sums16(part), scale_v));
    }
  }
#else
  // fp32 FMAs, then one horizontal sum per (query, key); queries taken 4 at a time so that their
  // 16 vectors stay in registers
  for (int64_t g0 = 0; g0 < Gn; g0 += 4) {
    const int64_t gn = std::min<int64_t>(4, Gn - g0);
    __m512 qv[4][4];
    for (int64_t g = 0; g < gn; ++g)
      for (int c = 0; c < 4; ++c)
        qv[g][c] = _mm512_mul_ps(load_bf16(q + (g0 + g) * kHeadDim + 16 * c), _mm512_set1_ps(scale));
    for (int64_t l = 0; l < L; ++l) {
      const uint16_t* key = kr.k + l * kr.k_stride;
      const __m512 k0 = load_bf16(key), k1 = load_bf16(key + 16), k2 = load_bf16(key + 32), k3 = load_bf16(key + 48);
      for (int64_t g = 0; g < gn; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], k0);
        a = _mm512_fmadd_ps(qv[g][1], k1, a);
        a = _mm512_fmadd_ps(qv[g][2], k2, a);
        a = _mm512_fmadd_ps(qv[g][3], k3, a);
        scores[(g0 + g) * Lp + kr.offset + l] = _mm512_reduce_add_ps(a);
      }
    }
  }
#endif
}

// Attention of Gn queries over the keys of `ranges`; out (Gn, 64) bf16, lse (Gn,).
void attend_item(const uint16_t* q, int64_t Gn, const KeyRange* ranges, int n_ranges, float scale,
                 std::vector<float>& scores, uint16_t* out, float* lse) {
  int64_t Lp = 0;
  for (int r = 0; r < n_ranges; ++r) Lp += (ranges[r].len + 15) / 16 * 16;
  if (Lp == 0) {
    for (int64_t g = 0; g < Gn; ++g) {
      for (int c = 0; c < 4; ++c) store_bf16(out + g * kHeadDim + 16 * c, _mm512_setzero_ps());
      lse[g] = -INFINITY;
    }
    return;
  }
  scores.assign(Gn * Lp, -INFINITY);
  for (int r = 0; r < n_ranges; ++r) score_range(q, Gn, ranges[r], scale, scores.data(), Lp);
  float inv_total[kMaxGroup];
  for (int64_t g = 0; g < Gn; ++g) {
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
    lse[g] = mx + std::log(total);
  }
#ifdef __AVX512BF16__
  // the weights in bf16, in a second buffer after the fp32 scores (Lp is a multiple of 16)
  scores.resize(Gn * Lp + (Gn * Lp + 1) / 2);
  uint16_t* wb = reinterpret_cast<uint16_t*>(scores.data() + Gn * Lp);
  for (int64_t j = 0; j < Gn * Lp; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(scores.data() + j)));
#endif
  for (int64_t g = 0; g < Gn; g += kQueryBlock) {
    uint16_t* og = out + g * kHeadDim;
#ifdef __AVX512BF16__
    const uint16_t* w = wb + g * Lp;
#define SPA_WEIGHTED_VALUES weighted_values_bf16
#else
    const float* w = scores.data() + g * Lp;
#define SPA_WEIGHTED_VALUES weighted_values
#endif
    switch (std::min<int64_t>(kQueryBlock, Gn - g)) {
      case 1: SPA_WEIGHTED_VALUES<1>(ranges, n_ranges, w, Lp, inv_total + g, og); break;
      case 2: SPA_WEIGHTED_VALUES<2>(ranges, n_ranges, w, Lp, inv_total + g, og); break;
      case 3: SPA_WEIGHTED_VALUES<3>(ranges, n_ranges, w, Lp, inv_total + g, og); break;
      case 4: SPA_WEIGHTED_VALUES<4>(ranges, n_ranges, w, Lp, inv_total + g, og); break;
      case 5: SPA_WEIGHTED_VALUES<5>(ranges, n_ranges, w, Lp, inv_total + g, og); break;
      default: SPA_WEIGHTED_VALUES<6>(ranges, n_ranges, w, Lp, inv_total + g, og); break;
    }
#undef SPA_WEIGHTED_VALUES
  }
}

void check_kv(const at::Tensor& k, const at::Tensor& v, const char* what) {
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decode_attention: ", what, " must be bfloat16");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.stride(3) == 1 && v.stride(3) == 1 && k.size(3) == kHeadDim &&
              v.size(3) == kHeadDim, "decode_attention: ", what, " must be 4-D with a contiguous last dimension of 64");
}

// The shared implementation: row n reads the first seg_lens[seg[n]] keys of segment seg[n]
// (when seg[n] >= 0), then its own first lens[n] keys.
std::vector<at::Tensor> attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                               const at::Tensor* seg_k, const at::Tensor* seg_v, const at::Tensor* seg,
                               const at::Tensor* seg_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "decode_attention: q must be bfloat16");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.size(3) == kHeadDim,
              "decode_attention: q must be contiguous (rows, heads, queries, 64)");
  check_kv(k, v, "k and v");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous(), "decode_attention: lens must be int64");
  const int64_t N = q.size(0), H = q.size(1), G = q.size(2);
  TORCH_CHECK(k.size(0) == N && k.size(1) == H && v.size(0) == N && v.size(1) == H && lens.size(0) == N,
              "decode_attention: shapes disagree");
  const int64_t max_len = N ? lens.max().item<int64_t>() : 0;
  TORCH_CHECK(max_len <= k.size(2) && max_len <= v.size(2), "decode_attention: lens exceed the keys");
  const int64_t* segp = nullptr;
  const int64_t* slp = nullptr;
  if (seg != nullptr) {
    check_kv(*seg_k, *seg_v, "segment k and v");
    TORCH_CHECK(seg->scalar_type() == at::kLong && seg->is_contiguous() && seg->size(0) == N &&
                seg_lens->scalar_type() == at::kLong && seg_lens->is_contiguous(),
                "decode_attention: segment indices and lengths must be int64, one index per row");
    const int64_t S = seg_lens->size(0);
    TORCH_CHECK(seg_k->size(0) >= S && seg_v->size(0) >= S && seg_k->size(1) == H && seg_v->size(1) == H,
                "decode_attention: segment shapes disagree");
    TORCH_CHECK(S == 0 || (seg_lens->max().item<int64_t>() <= seg_k->size(2) &&
                           seg_lens->max().item<int64_t>() <= seg_v->size(2)),
                "decode_attention: segment lengths exceed the keys");
    segp = seg->data_ptr<int64_t>();
    slp = seg_lens->data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n)
      TORCH_CHECK(segp[n] < S, "decode_attention: segment index out of range");
  }
  auto out = at::empty({N, H, G, kHeadDim}, q.options());
  auto lse = at::empty({N, H, G}, q.options().dtype(at::kFloat));
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  const uint16_t* skp = segp ? reinterpret_cast<const uint16_t*>(seg_k->data_ptr()) : nullptr;
  const uint16_t* svp = segp ? reinterpret_cast<const uint16_t*>(seg_v->data_ptr()) : nullptr;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  float* lsep = lse.data_ptr<float>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);

  // G above kMaxGroup (a shared prefix's block of several rows' queries): C near-equal chunks
  // of at most kMaxGroup queries, each a work item that reads the keys again (from cache)
  const int64_t C = (G + kMaxGroup - 1) / kMaxGroup, Gc = C ? (G + C - 1) / C : 0;
  at::parallel_for(0, N * H * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // (Gc, padded keys): unnormalised weights after the exp
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / C, g0 = (item % C) * Gc, Gn = std::min(Gc, G - g0);
      const int64_t n = i / H, h = i % H;
      KeyRange ranges[2];
      int n_ranges = 0;
      int64_t offset = 0;
      if (segp && segp[n] >= 0 && slp[segp[n]] > 0) {
        const int64_t s = segp[n];
        ranges[n_ranges++] = {skp + s * seg_k->stride(0) + h * seg_k->stride(1),
                              svp + s * seg_v->stride(0) + h * seg_v->stride(1),
                              seg_k->stride(2), seg_v->stride(2), slp[s], 0};
        offset = (slp[s] + 15) / 16 * 16;
      }
      if (lp[n] > 0)
        ranges[n_ranges++] = {kp + n * k.stride(0) + h * k.stride(1), vp + n * v.stride(0) + h * v.stride(1),
                              k.stride(2), v.stride(2), lp[n], offset};
      attend_item(qp + (i * G + g0) * kHeadDim, Gn, ranges, n_ranges, fscale, scores,
                  op + (i * G + g0) * kHeadDim, lsep + i * G + g0);
    }
  });
  return {out, lse};
}

}  // namespace

// q (N, H, G, 64) bf16 contiguous; k, v (N, H, >= max(lens), 64) bf16 with a contiguous last
// dimension (views of the cache buffers; a stride of 0 shares keys between rows); lens (N,)
// int64. Returns out (N, H, G, 64) bf16 and lse (N, H, G) fp32; a row with no keys gets zeros
// and lse = -inf. Any G: above 16 queries are split into chunks (a shared prefix's block).
std::vector<at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& lens, double scale) {
  return attend(q, k, v, lens, nullptr, nullptr, nullptr, nullptr, scale);
}

// As decode_attention, each row first reading a shared prefix: seg (N,) int64 is the row's
// segment (-1: none) in seg_k, seg_v (S', H, >= max(seg_lens), 64), of which it reads the first
// seg_lens[seg[n]] keys; one softmax over the prefix and the private keys. This replaces the
// separate prefix attention and the log-sum-exp merge (a dozen small tensor ops per layer).
std::vector<at::Tensor> decode_attention_with_prefix(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& lens, const at::Tensor& seg_k,
                                                     const at::Tensor& seg_v, const at::Tensor& seg,
                                                     const at::Tensor& seg_lens, double scale) {
  return attend(q, k, v, lens, &seg_k, &seg_v, &seg, &seg_lens, scale);
}

void register_decoder_ops(pybind11::module& m);  // decoder_ops.cpp
void register_training_attention(pybind11::module& m);  // training_attention.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decoder_ops(m);
  register_training_attention(m);
  m.def("decode_attention", &decode_attention, "decode attention over bf16 K/V (AVX-512)");
  m.def("decode_attention_with_prefix", &decode_attention_with_prefix,
        "decode attention over a shared prefix and private bf16 K/V, one softmax (AVX-512)");
}
