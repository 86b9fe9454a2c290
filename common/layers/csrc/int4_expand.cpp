// Int4 weights expanded to float for one matmul (common/layers/quantized_linear.py): built into the same library
// as paged_attention.cpp, by common/layers/paged_attention_cpu.py.
//
//   int4_expand(nibbles [N, K/2] uint8, scales [N, G, 1], offsets [N, G, 1], out [N, K] in the scales' dtype)
// Byte j of a row holds weight 2j in its low nibble and 2j + 1 in its high one; weight k is q * scale + offset of
// its group k / (K / G). fp32 or bf16.
//
// Per group, the 16 values a code can take are computed once (in fp32, rounded once to the output dtype), then
// every weight is a table lookup: far cheaper than converting and scaling each weight, and exactly what
// q * scale + offset rounds to. With AVX-512 BW a bf16 lookup is 32 weights per instruction (the table sits in a
// register); elsewhere two per byte. Rows are split across threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace nano_pd_int4 {

// float -> bf16 bits, rounded to nearest even; no NaN case (scales and offsets are finite), so it vectorises
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline void make_table(float s, float o, float* table) {
  for (int q = 0; q < 16; ++q) table[q] = static_cast<float>(q) * s + o;
}

void expand_rows_f32(const uint8_t* nibbles, const float* scales, const float* offsets, float* out, int64_t a,
                     int64_t b, int64_t K, int64_t G) {
  const int64_t group = K / G;
  float table[16];
  for (int64_t n = a; n < b; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      make_table(scales[n * G + g], offsets[n * G + g], table);
      const uint8_t* src = nibbles + n * (K / 2) + g * (group / 2);
      float* dst = out + n * K + g * group;
      for (int64_t j = 0; j < group / 2; ++j) {
        dst[2 * j] = table[src[j] & 0x0F];
        dst[2 * j + 1] = table[src[j] >> 4];
      }
    }
  }
}

void expand_rows_bf16(const uint8_t* nibbles, const c10::BFloat16* scales, const c10::BFloat16* offsets,
                      uint16_t* out, int64_t a, int64_t b, int64_t K, int64_t G) {
  const int64_t group = K / G;
#if defined(__AVX512BW__)
  // the table is built in a register: 16 floats q * s + o, rounded to bf16 in integer lanes, narrowed to 16-bit
  // lanes 0..15; then 16 bytes -> 32 codes in output order (a u32 lane holds byte i's low nibble, then its high
  // one) and one 16-bit permute looks all 32 up
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i low4 = _mm512_set1_epi32(0x0F), one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  if (group % 32 == 0) {
    for (int64_t n = a; n < b; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const __m512 v = _mm512_fmadd_ps(codes, _mm512_set1_ps(static_cast<float>(scales[n * G + g])),
                                         _mm512_set1_ps(static_cast<float>(offsets[n * G + g])));
        __m512i u = _mm512_castps_si512(v);
        u = _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
        const __m512i lut = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        const uint8_t* src = nibbles + n * (K / 2) + g * (group / 2);
        uint16_t* dst = out + n * K + g * group;
        for (int64_t j = 0; j < group / 2; j += 16) {
          const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
          const __m512i idx =
              _mm512_or_si512(_mm512_and_si512(w, low4), _mm512_slli_epi32(_mm512_srli_epi32(w, 4), 16));
          _mm512_storeu_si512(dst + 2 * j, _mm512_permutexvar_epi16(idx, lut));
        }
      }
    }
    return;
  }
#endif
  float values[16];
  uint16_t table[16];
  for (int64_t n = a; n < b; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      make_table(static_cast<float>(scales[n * G + g]), static_cast<float>(offsets[n * G + g]), values);
      for (int q = 0; q < 16; ++q) table[q] = bf16_bits(values[q]);
      const uint8_t* src = nibbles + n * (K / 2) + g * (group / 2);
      uint16_t* dst = out + n * K + g * group;
      for (int64_t j = 0; j < group / 2; ++j) {
        dst[2 * j] = table[src[j] & 0x0F];
        dst[2 * j + 1] = table[src[j] >> 4];
      }
    }
  }
}

void int4_expand(const at::Tensor& nibbles, const at::Tensor& scales, const at::Tensor& offsets, at::Tensor out) {
  TORCH_CHECK(nibbles.device().is_cpu() && nibbles.scalar_type() == at::kByte && nibbles.dim() == 2 &&
                  nibbles.is_contiguous(),
              "int4_expand: nibbles must be a contiguous [N, K/2] uint8 CPU tensor");
  const int64_t N = nibbles.size(0), K = nibbles.size(1) * 2;
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == N && scales.size(2) == 1 && scales.is_contiguous() &&
                  offsets.sizes() == scales.sizes() && offsets.scalar_type() == scales.scalar_type() &&
                  offsets.is_contiguous(),
              "int4_expand: scales and offsets must be contiguous [N, G, 1] tensors of one dtype");
  const int64_t G = scales.size(1);
  TORCH_CHECK(G >= 1 && K % G == 0 && (K / G) % 2 == 0, "int4_expand: K must hold G groups of an even size");
  TORCH_CHECK(out.scalar_type() == scales.scalar_type() && out.dim() == 2 && out.size(0) == N && out.size(1) == K &&
                  out.is_contiguous(),
              "int4_expand: out must be a contiguous [N, K] tensor of the scales' dtype");
  const uint8_t* src = nibbles.data_ptr<uint8_t>();
  // about 16 KiB of output per task, so a thread's share is never a handful of rows
  const int64_t grain = std::max<int64_t>(1, 8192 / K);
  if (scales.scalar_type() == at::kFloat) {
    const float *s = scales.data_ptr<float>(), *o = offsets.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { expand_rows_f32(src, s, o, dst, a, b, K, G); });
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16, "int4_expand: float32 or bfloat16 scales");
    using bf16 = c10::BFloat16;
    const bf16 *s = scales.data_ptr<bf16>(), *o = offsets.data_ptr<bf16>();
    auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<bf16>());
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { expand_rows_bf16(src, s, o, dst, a, b, K, G); });
  }
}

}  // namespace nano_pd_int4

TORCH_LIBRARY_FRAGMENT(nano_pd, m) {
  m.def("int4_expand(Tensor nibbles, Tensor scales, Tensor offsets, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(nano_pd, CPU, m) { m.impl("int4_expand", &nano_pd_int4::int4_expand); }
