// Int8 weights in groups of 32 (GGUF's Q8_0) multiplied by a few rows of activations, without expanding the weight
// (common/layers/quantized_linear.py): built into the same library as paged_attention.cpp, by
// common/layers/paged_attention_cpu.py.
//
//   int8_linear(x [M, K] fp32/bf16, codes [N, K] int8, scales [N, K/32] fp32) -> [M, N] fp32
//   out[m, n] = sum over groups g of scales[n, g] * sum over k in g of codes[n, k] * x[m, k], in fp32
// The output stays fp32 whatever x is: these are logits, and bf16's resolution at a logit of 20 (0.125) turns the
// near-ties greedy decoding meets into exact ties.
//
// A decode step of a few rows is bound by reading the weight: this reads one byte a weight where a bf16 weight is two
// (SmolLM2's tied LM head: 28 MB instead of 57). Output rows are split across threads; each weight group is widened
// to fp32 once and used by up to four activation rows. Without AVX-512 the scalar loop is correct but slow, so
// Python only routes here from an AVX-512 build.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace nano_pd_int8 {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowsAtOnce = 4;

void rows_of_n(const float* x, const int8_t* codes, const float* scales, float* out, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  const int64_t G = K / kGroup;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* q = codes + n * K;
    const float* s = scales + n * G;
    for (int64_t m0 = 0; m0 < M; m0 += kRowsAtOnce) {
      const int64_t rows = std::min(kRowsAtOnce, M - m0);
#if defined(__AVX512F__)
      __m512 total[kRowsAtOnce];
      for (int64_t i = 0; i < kRowsAtOnce; ++i) total[i] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        // the group's weights q * scale in fp32, as the dequantized reference has them, then two FMAs a row
        const __m128i* src = reinterpret_cast<const __m128i*>(q + g * kGroup);
        const __m512 scale = _mm512_set1_ps(s[g]);
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src))), scale);
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src + 1))), scale);
        for (int64_t i = 0; i < rows; ++i) {
          const float* xr = x + (m0 + i) * K + g * kGroup;
          total[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), total[i]));
        }
      }
      for (int64_t i = 0; i < rows; ++i) out[(m0 + i) * N + n] = _mm512_reduce_add_ps(total[i]);
#else
      for (int64_t i = 0; i < rows; ++i) {
        const float* xr = x + (m0 + i) * K;
        float total = 0.f;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) total += static_cast<float>(q[k]) * s[g] * xr[k];
        out[(m0 + i) * N + n] = total;
      }
#endif
    }
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(),
              "int8_linear: codes must be a contiguous [N, K] int8 CPU tensor");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(K % kGroup == 0, "int8_linear: K must be a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) == K / kGroup && scales.is_contiguous(),
              "int8_linear: scales must be a contiguous [N, K/32] float32 tensor");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_linear: x must be a [M, K] float32 or bfloat16 CPU tensor");
  const int64_t M = x.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // a few rows: widened once, not once per weight group
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // 64 output rows per task: 18 KiB of SmolLM2's weight, enough to hide the scheduling
  at::parallel_for(0, N, 64, [&](int64_t a, int64_t b) { rows_of_n(xp, qp, sp, op, M, N, K, a, b); });
  return out;
}

}  // namespace nano_pd_int8

TORCH_LIBRARY_FRAGMENT(nano_pd, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_pd, CPU, m) { m.impl("int8_linear", &nano_pd_int8::int8_linear); }
