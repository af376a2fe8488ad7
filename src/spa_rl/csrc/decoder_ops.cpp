// The small operations of a Llama decoder layer, fused, for the rollout engine on x86 CPUs with
// AVX-512 (built with decode_attention.cpp into one extension by spa_rl/kernels.py).
//
// Why: at 16 rows, a decode step's norms, rotary embedding, SiLU and residual adds are about 25
// PyTorch operations per layer, each a few microseconds of dispatch for a few thousand numbers
// (4.4 ms of a ~50 ms step, docs/performance.md). Here they are 4 calls per layer.
//
// Numerics follow the PyTorch operations of LlamaDecoder (llama.py) step by step: every
// operation that PyTorch runs in bf16 is computed in fp32 and rounded to bf16 (round to nearest
// even) at the same place, so rounding happens where it happens there. What can differ is the
// fp32 order of the norm's sum of squares and the last fp32 bit of exp in SiLU: a bf16 result
// then rarely moves by one step (tests/rollout/test_decoder_ops.py bounds it).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>


#include "avx512_math.h"

namespace {

const uint16_t* bf16_data(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* bf16_data(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous() && x.size(1) % 16 == 0,
              "decoder_ops: ", name, " must be a contiguous 2-D bfloat16 tensor with rows of a multiple of 16");
}

void check_norm_weight(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.numel() == x.size(1),
              "decoder_ops: the norm weight must be bfloat16 of the row size");
}

// y = w * bf16(x * rsqrt(mean(x^2) + eps)) for one row of D values held in fp32 (D % 16 == 0).
inline void norm_row(const float* x, const uint16_t* w, int64_t D, float eps, uint16_t* y) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(D) + eps));
  for (int64_t j = 0; j < D; j += 16)
    store_bf16(y + j, _mm512_mul_ps(load_bf16(w + j), round_bf16(_mm512_mul_ps(_mm512_loadu_ps(x + j), r))));
}

constexpr int64_t kRowGrain = 8;  // rows per parallel work item (decode steps have ~16)

}  // namespace

// RMSNorm of each row of x (N, D) with weight w (D,): LlamaDecoder.norm.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  check_norm_weight(w, x);
  const int64_t N = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  const uint16_t *xp = bf16_data(x), *wp = bf16_data(w);
  uint16_t* yp = bf16_data(y);
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < D; j += 16) _mm512_storeu_ps(row.data() + j, load_bf16(xp + i * D + j));
      norm_row(row.data(), wp, D, float(eps), yp + i * D);
    }
  });
  return y;
}

// s = x + r (rounded to bf16: the residual stream), then RMSNorm of s: returns (s, norm(s)).
std::vector<at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(r, "r");
  TORCH_CHECK(x.sizes() == r.sizes(), "decoder_ops: x and r must have one shape");
  check_norm_weight(w, x);
  const int64_t N = x.size(0), D = x.size(1);
  auto s = at::empty_like(x);
  auto y = at::empty_like(x);
  const uint16_t *xp = bf16_data(x), *rp = bf16_data(r), *wp = bf16_data(w);
  uint16_t *sp = bf16_data(s), *yp = bf16_data(y);
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < D; j += 16) {
        const __m512 v = round_bf16(_mm512_add_ps(load_bf16(xp + i * D + j), load_bf16(rp + i * D + j)));
        store_bf16(sp + i * D + j, v);  // exact: v is a bf16 value already
        _mm512_storeu_ps(row.data() + j, v);
      }
      norm_row(row.data(), wp, D, float(eps), yp + i * D);
    }
  });
  return {s, y};
}

// Rotary embedding of q and k and the split of the fused projection qkv (N, (H + 2 KV) d) into
// contiguous q (N, H, d), k (N, KV, d), v (N, KV, d); cos, sin (N, d) bf16; transformers'
// rotate-half convention: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to
// bf16 as the three bf16 PyTorch operations round them. d % 32 == 0.
std::vector<at::Tensor> rope_split(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                                   int64_t KV) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t N = qkv.size(0), d = cos.size(1), half = d / 2;
  TORCH_CHECK(d % 32 == 0 && qkv.size(1) == (H + 2 * KV) * d && cos.size(0) == N && sin.sizes() == cos.sizes(),
              "decoder_ops: rope_split shapes disagree");
  auto q = at::empty({N, H, d}, qkv.options());
  auto k = at::empty({N, KV, d}, qkv.options());
  auto v = at::empty({N, KV, d}, qkv.options());
  const uint16_t *xp = bf16_data(qkv), *cp = bf16_data(cos), *sp = bf16_data(sin);
  uint16_t *qp = bf16_data(q), *kp = bf16_data(k), *vp = bf16_data(v);
  const int64_t width = (H + 2 * KV) * d;
  const __m512 minus = _mm512_set1_ps(-1.f);
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* c = cp + i * d;
      const uint16_t* s = sp + i * d;
      for (int64_t h = 0; h < H + KV; ++h) {
        const uint16_t* x = xp + i * width + h * d;
        uint16_t* y = h < H ? qp + (i * H + h) * d : kp + (i * KV + h - H) * d;
        for (int64_t j = 0; j < half; j += 16) {
          const __m512 x1 = load_bf16(x + j), x2 = load_bf16(x + half + j);
          // first half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin (each rounded)
          const __m512 a1 = round_bf16(_mm512_mul_ps(x1, load_bf16(c + j)));
          const __m512 b1 = round_bf16(_mm512_mul_ps(_mm512_mul_ps(x2, minus), load_bf16(s + j)));
          const __m512 a2 = round_bf16(_mm512_mul_ps(x2, load_bf16(c + half + j)));
          const __m512 b2 = round_bf16(_mm512_mul_ps(x1, load_bf16(s + half + j)));
          store_bf16(y + j, _mm512_add_ps(a1, b1));
          store_bf16(y + half + j, _mm512_add_ps(a2, b2));
        }
      }
      std::memcpy(vp + i * KV * d, xp + i * width + (H + KV) * d, KV * d * sizeof(uint16_t));
    }
  });
  return {q, k, v};
}

// silu(gate) * up for gate_up (N, 2 I) = [gate | up]: bf16(bf16(silu(gate)) * up), with
// silu(x) = x / (1 + e^-x) computed as x / (1 + e) for x >= 0 and x e / (1 + e) for x < 0,
// e = e^-|x| (the exp of a non-positive number: no overflow).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(I % 16 == 0, "decoder_ops: gate_up must hold two halves of a multiple of 16");
  auto y = at::empty({N, I}, gate_up.options());
  const uint16_t* xp = bf16_data(gate_up);
  uint16_t* yp = bf16_data(y);
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* g = xp + i * 2 * I;
      const uint16_t* u = g + I;
      for (int64_t j = 0; j < I; j += 16) {
        const __m512 x = load_bf16(g + j);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
        const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 num = _mm512_mask_mul_ps(x, negative, x, e);
        const __m512 silu = round_bf16(_mm512_div_ps(num, _mm512_add_ps(one, e)));
        store_bf16(yp + i * I + j, _mm512_mul_ps(silu, load_bf16(u + j)));
      }
    }
  });
  return y;
}

void register_decoder_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows");
  m.def("add_rms_norm", &add_rms_norm, "residual add, then RMSNorm, of bf16 rows");
  m.def("rope_split", &rope_split, "rotary embedding of q and k, split of the fused qkv projection");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of the fused gate/up projection");
}
