// The elementwise passes of the training attention's query blocks (spa_rl/training.py) on x86
// CPUs with AVX-512, built with the rollout kernels into one extension by spa_rl/kernels.py.
//
// A block holds the queries start..start + L of one packed row and its keys up to the block's
// last query: the L queries are the last L of E keys, so query i sees keys 0..E - L + i. Its
// products (Q K^T, P V and the backward's four) are oneDNN batched matmuls in bf16; these two
// passes sit between them. Compiled by inductor they took more time than the products; here
// the causal mask is a count of visible keys per row, and each pass reads and writes each
// score once.
//
// Numerics follow the block functions of training.py step by step (scores rounded to bf16 by
// the product, then scaled in fp32; fp32 softmax statistics; weights and gradients rounded to
// bf16 for the next product, round to nearest even). What can differ is the fp32 summation
// order and the last bit of exp (tests/test_training.py bounds the difference).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "avx512_math.h"

namespace {

void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 3 && t.is_contiguous(), "training_attention: ", name,
              " must be a contiguous (heads, rows, keys) bfloat16 tensor");
}

// Visible keys of score row `row` of a (B, R, E) block whose rows are query groups of L.
inline int64_t visible_keys(int64_t row, int64_t R, int64_t L, int64_t E) { return E - L + (row % R) % L + 1; }

constexpr int64_t kRowGrain = 16;  // score rows per parallel work item

}  // namespace

// scores (B, R, E) bf16, the product Q K^T of a block (R = G * L query rows per head, row r is
// query r % L): in place, the unnormalised softmax weights exp(scale * s - peak) of the visible
// keys and 0 after the query, rounded to bf16. Returns (total, lse), fp32 (B, R): the fp32 sum
// of the weights (before rounding) and peak + log(total).
std::vector<at::Tensor> causal_softmax_(at::Tensor& scores, int64_t L, double scale) {
  check_scores(scores, "scores");
  const int64_t B = scores.size(0), R = scores.size(1), E = scores.size(2);
  TORCH_CHECK(L >= 1 && L <= E && R % L == 0, "training_attention: a block of ", L, " queries cannot have ", R,
              " rows over ", E, " keys");
  auto total = at::empty({B, R}, scores.options().dtype(at::kFloat));
  auto lse = at::empty({B, R}, scores.options().dtype(at::kFloat));
  auto* sp = reinterpret_cast<uint16_t*>(scores.data_ptr());
  float* tp = total.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const __m512 sc = _mm512_set1_ps(float(scale));
  at::parallel_for(0, B * R, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint16_t* s = sp + row * E;
      const int64_t visible = visible_keys(row, R, L, E);
      __m512 m = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < visible; j += 16) {
        const __mmask16 k = first_lanes(visible - j);
        m = _mm512_mask_max_ps(m, k, m, _mm512_mul_ps(load_bf16_masked(s + j, k), sc));
      }
      const float peak = _mm512_reduce_max_ps(m);  // finite: every query sees its own key
      const __m512 pv = _mm512_set1_ps(peak);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < visible; j += 16) {
        const __mmask16 k = first_lanes(visible - j);
        const __m512 e =
            _mm512_maskz_mov_ps(k, exp_nonpositive(_mm512_sub_ps(_mm512_mul_ps(load_bf16_masked(s + j, k), sc), pv)));
        sum = _mm512_add_ps(sum, e);
        store_bf16_masked(s + j, k, e);
      }
      for (int64_t j = visible; j < E; ++j) s[j] = 0;
      const float t = _mm512_reduce_add_ps(sum);
      tp[row] = t;
      lp[row] = peak + std::log(t);
    }
  });
  return {total, lse};
}

// The backward's elementwise part, in place: scores (the recomputed Q K^T) becomes the
// probabilities p = exp(scale * s - lse) of the visible keys (0 after the query), and grad_p
// (dO V^T) becomes the scores' gradient (grad_p - delta) * p * scale, both rounded to bf16
// (the gradient from the fp32 p). lse and delta: fp32 (B, R), delta = rowsum(dO * O).
void causal_softmax_backward_(at::Tensor& scores, at::Tensor& grad_p, const at::Tensor& lse, const at::Tensor& delta,
                              int64_t L, double scale) {
  check_scores(scores, "scores");
  check_scores(grad_p, "grad_p");
  const int64_t B = scores.size(0), R = scores.size(1), E = scores.size(2);
  TORCH_CHECK(grad_p.sizes() == scores.sizes(), "training_attention: grad_p and scores differ in shape");
  TORCH_CHECK(L >= 1 && L <= E && R % L == 0, "training_attention: a block of ", L, " queries cannot have ", R,
              " rows over ", E, " keys");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  delta.is_contiguous() && lse.numel() == B * R && delta.numel() == B * R,
              "training_attention: lse and delta must be contiguous float32 tensors of (heads, rows)");
  auto* sp = reinterpret_cast<uint16_t*>(scores.data_ptr());
  auto* gp = reinterpret_cast<uint16_t*>(grad_p.data_ptr());
  const float* lp = lse.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const __m512 sc = _mm512_set1_ps(float(scale));
  at::parallel_for(0, B * R, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint16_t* s = sp + row * E;
      uint16_t* g = gp + row * E;
      const int64_t visible = visible_keys(row, R, L, E);
      const __m512 lv = _mm512_set1_ps(lp[row]), dv = _mm512_set1_ps(dp[row]);
      for (int64_t j = 0; j < visible; j += 16) {
        const __mmask16 k = first_lanes(visible - j);
        // scale * s - lse <= 0 up to rounding (lse is the log of a sum that includes this term)
        const __m512 x = _mm512_sub_ps(_mm512_mul_ps(load_bf16_masked(s + j, k), sc), lv);
        const __m512 p = exp_nonpositive(_mm512_min_ps(x, _mm512_setzero_ps()));
        const __m512 gs = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load_bf16_masked(g + j, k), dv), p), sc);
        store_bf16_masked(s + j, k, p);
        store_bf16_masked(g + j, k, gs);
      }
      for (int64_t j = visible; j < E; ++j) s[j] = g[j] = 0;
    }
  });
}

void register_training_attention(pybind11::module& m) {
  m.def("causal_softmax_", &causal_softmax_, "a causal attention block's softmax, in place (bf16 scores)");
  m.def("causal_softmax_backward_", &causal_softmax_backward_,
        "a causal attention block's softmax backward, in place (bf16 scores and their gradient)");
}
