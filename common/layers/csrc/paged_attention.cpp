// Paged attention on CPU, reading K/V where they lie in the block pool (no gather copy).
//
// Built just-in-time by common/layers/paged_attention_cpu.py, which picks the instruction set from /proc/cpuinfo
// and passes it as compiler flags (-mavx512f ... or -mavx2 -mfma, never -march=native). The code below picks its
// vector width from the same flags at compile time: AVX-512, AVX2+FMA, or a portable path of plain loops that the
// compiler auto-vectorises for whatever it targets.
//
// Ops (namespace nano_pd, CPU; fake/meta kernels are registered from Python):
//   paged_attention_decode(q [n,H,D], k_cache, v_cache [blocks,block_size,KVH,D], block_tables [n,max_blocks] int32,
//                          context_lens [n] int32, scale) -> [n,H,D]
//   paged_attention_prefill(q [T,H,D], k_cache, v_cache, block_tables [S,max_blocks] int32, cu_seqlens_q [S+1] int32,
//                           context_lens [S] int32, scale) -> [T,H,D]
// fp32 and bf16 (q and cache of one dtype), fp32 accumulation, online softmax.
//
// Decode: one work item per sequence (or per split of its context when there are too few sequences for the
// threads; the partial softmax states are merged afterwards). Its context is walked in chunks of 32 tokens; for
// each chunk and kv head, the H/KVH query heads of that kv head are processed together so each K/V row is read
// once: scores are vectorised dot products over D, an online softmax (running max and sum) updates the state, and
// the V rows are accumulated with FMAs over D. The next chunk's rows are prefetched while one computes, since the
// block ids jump.
//
// Prefill: one work item per (sequence, kv head, tile of query positions); the G = H/KVH heads of each position
// are rows of one tile (M = G * positions rows), so K/V are read once per tile. For each chunk of keys the
// transposed scores S^T = K Q^T come from a register-blocked GEMM micro-kernel (broadcast one K element, FMA
// against a vector of query rows), the column-wise online softmax runs across the rows in vector lanes, and
// O += P V is a second micro-kernel. Causally dead tiles are skipped.

// lean headers: <ATen/ATen.h> triples the compile time
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace nano_pd_paged {

using bf16 = c10::BFloat16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------------
// Vector abstraction: Vec holds W floats. load(bf16*) widens bf16 to fp32 in registers (a 16-bit shift).
// ---------------------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
#define NPD_ISA "avx512"
struct Vec {
  static constexpr int W = 16;
  __m512 v;
  Vec() = default;
  Vec(__m512 x) : v(x) {}
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const bf16* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
};
inline Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a.v, b.v); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a.v, b.v); }
inline Vec vround(Vec a) { return _mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for n integral in [-126, 127]
inline Vec vpow2i(Vec n) {
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
// lanes where x < t become 0, others keep r
inline Vec zero_where_lt(Vec x, float t, Vec r) {
  __mmask16 m = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(t), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(r.v, m, _mm512_setzero_ps());
}
// lanes >= n (0 <= n <= W) become fill
inline Vec keep_first(Vec a, int n, Vec fill) {
  __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_mask_blend_ps(m, fill.v, a.v);
}
// lanes where lim[i] <= c become fill (lim holds float-exact integers)
inline Vec keep_where_gt(Vec a, Vec lim, float c, Vec fill) {
  __mmask16 m = _mm512_cmp_ps_mask(lim.v, _mm512_set1_ps(c), _CMP_GT_OQ);
  return _mm512_mask_blend_ps(m, fill.v, a.v);
}
constexpr int kMR = 8;  // GEMM micro-kernel rows (2 vectors wide): 16 accumulators of 32 registers

#elif defined(__AVX2__) && defined(__FMA__)
#define NPD_ISA "avx2"
struct Vec {
  static constexpr int W = 8;
  __m256 v;
  Vec() = default;
  Vec(__m256 x) : v(x) {}
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float x) { return _mm256_set1_ps(x); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const bf16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  float reduce_add() const {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
  }
  float reduce_max() const {
    __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_max_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_max_ss(lo, sh));
  }
};
inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a.v, b.v); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a.v, b.v); }
inline Vec vround(Vec a) { return _mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vpow2i(Vec n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline Vec zero_where_lt(Vec x, float t, Vec r) {
  __m256 m = _mm256_cmp_ps(x.v, _mm256_set1_ps(t), _CMP_LT_OQ);
  return _mm256_andnot_ps(m, r.v);
}
inline Vec keep_first(Vec a, int n, Vec fill) {
  const __m256 iota = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  __m256 m = _mm256_cmp_ps(iota, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
  return _mm256_blendv_ps(fill.v, a.v, m);
}
inline Vec keep_where_gt(Vec a, Vec lim, float c, Vec fill) {
  __m256 m = _mm256_cmp_ps(lim.v, _mm256_set1_ps(c), _CMP_GT_OQ);
  return _mm256_blendv_ps(fill.v, a.v, m);
}
constexpr int kMR = 6;  // 12 accumulators + 2 B vectors + 1 broadcast of 16 registers

#else
#define NPD_ISA "portable"
// Plain loops over a small array; the compiler vectorises them for whatever the target offers.
// (-DNPD_PORTABLE_WIDTH=16 builds this path at the AVX-512 width, to test the width-generic code.)
#ifndef NPD_PORTABLE_WIDTH
#define NPD_PORTABLE_WIDTH 8
#endif
struct Vec {
  static constexpr int W = NPD_PORTABLE_WIDTH;
  float v[W];
  static Vec zero() { Vec r; for (int i = 0; i < W; ++i) r.v[i] = 0.f; return r; }
  static Vec set1(float x) { Vec r; for (int i = 0; i < W; ++i) r.v[i] = x; return r; }
  static Vec load(const float* p) { Vec r; std::memcpy(r.v, p, sizeof(r.v)); return r; }
  static Vec load(const bf16* p) {
    Vec r;
    for (int i = 0; i < W; ++i) {
      uint32_t u = static_cast<uint32_t>(p[i].x) << 16;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof(v)); }
  float reduce_add() const { float s = 0.f; for (int i = 0; i < W; ++i) s += v[i]; return s; }
  float reduce_max() const { float s = v[0]; for (int i = 1; i < W; ++i) s = v[i] > s ? v[i] : s; return s; }
};
#define NPD_BINOP(name, expr) \
  inline Vec name(Vec a, Vec b) { Vec r; for (int i = 0; i < Vec::W; ++i) r.v[i] = (expr); return r; }
NPD_BINOP(operator+, a.v[i] + b.v[i])
NPD_BINOP(operator-, a.v[i] - b.v[i])
NPD_BINOP(operator*, a.v[i] * b.v[i])
NPD_BINOP(vmax, a.v[i] > b.v[i] ? a.v[i] : b.v[i])
NPD_BINOP(vmin, a.v[i] < b.v[i] ? a.v[i] : b.v[i])
#undef NPD_BINOP
inline Vec fmadd(Vec a, Vec b, Vec c) { Vec r; for (int i = 0; i < Vec::W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r; }
inline Vec vround(Vec a) { Vec r; for (int i = 0; i < Vec::W; ++i) r.v[i] = std::nearbyint(a.v[i]); return r; }
inline Vec vpow2i(Vec n) {
  Vec r;
  for (int i = 0; i < Vec::W; ++i) {
    uint32_t u = static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23;
    std::memcpy(&r.v[i], &u, 4);
  }
  return r;
}
inline Vec zero_where_lt(Vec x, float t, Vec r) { Vec o; for (int i = 0; i < Vec::W; ++i) o.v[i] = x.v[i] < t ? 0.f : r.v[i]; return o; }
inline Vec keep_first(Vec a, int n, Vec fill) { Vec o; for (int i = 0; i < Vec::W; ++i) o.v[i] = i < n ? a.v[i] : fill.v[i]; return o; }
inline Vec keep_where_gt(Vec a, Vec lim, float c, Vec fill) {
  Vec o; for (int i = 0; i < Vec::W; ++i) o.v[i] = lim.v[i] > c ? a.v[i] : fill.v[i]; return o;
}
constexpr int kMR = 6;
#endif

constexpr int W = Vec::W;

// exp(x), Cephes-style: 2^n * p(r) with r = x - n ln2; relative error ~2 ulp; exp(x) = 0 for x < -87.33 (so
// exp(-inf) = 0). Only called with x <= 0 here; the upper clamp keeps 2^n finite.
inline Vec vexp(Vec x) {
  Vec xc = vmax(vmin(x, Vec::set1(88.0f)), Vec::set1(-87.3365478515625f));
  Vec n = vround(xc * Vec::set1(1.44269504088896341f));
  Vec r = fmadd(n, Vec::set1(-0.693359375f), xc);
  r = fmadd(n, Vec::set1(2.12194440e-4f), r);
  Vec y = Vec::set1(1.9875691500e-4f);
  y = fmadd(y, r, Vec::set1(1.3981999507e-3f));
  y = fmadd(y, r, Vec::set1(8.3334519073e-3f));
  y = fmadd(y, r, Vec::set1(4.1665795894e-2f));
  y = fmadd(y, r, Vec::set1(1.6666665459e-1f));
  y = fmadd(y, r, Vec::set1(5.0000001201e-1f));
  y = fmadd(y, r * r, r + Vec::set1(1.0f));
  return zero_where_lt(x, -87.3365478515625f, y * vpow2i(n));
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }
template <typename T> inline T from_float(float x) { return static_cast<T>(x); }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Where (block, offset, kv head) of a cache lives: base + block*sb + offset*st + head*sh; the head_dim stride is 1.
template <typename T>
struct CacheView {
  const T* base;
  int64_t sb, st, sh;
  const T* row(int64_t block, int64_t off, int64_t head) const { return base + block * sb + off * st + head * sh; }
};

template <typename T>
CacheView<T> cache_view(const at::Tensor& c) {
  return {c.data_ptr<T>(), c.stride(0), c.stride(1), c.stride(2)};
}

// Runs body(item, thread) for item in [0, n) on at::get_num_threads() threads (dynamic schedule: items differ in
// cost). Serial when there is one thread or we are already inside a parallel region.
template <typename Init, typename Body>
void parallel_items(int64_t n, Init&& init, Body&& body) {
  int nt = (at::in_parallel_region() || omp_in_parallel()) ? 1 : at::get_num_threads();
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, n)));
  if (nt == 1) {
    init(0);
    for (int64_t i = 0; i < n; ++i) body(i, 0);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    init(t);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) body(i, t);
  }
}

int threads_available() {
  return (at::in_parallel_region() || omp_in_parallel()) ? 1 : at::get_num_threads();
}

// ---------------------------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------------------------
constexpr int kDecodeChunk = 32;  // tokens whose scores are held at once (multiple of W)
constexpr int kMaxGroup = 8;      // query heads of one kv head processed together (more are split into groups)
constexpr int64_t kMaxSplit = 64;

struct DecodeScratch {
  std::vector<float> qf, s, m, l, acc;
  std::vector<const void*> kp, vp;
};

// acc[j][0:NV*W] += sum_t p[j][t] v_t[off:off+NV*W]
template <typename T, int GS, int NV>
inline void decode_pv(const T* const* vp, int64_t off, int n, const float* p, float* acc, int D) {
  Vec a[GS][NV];
  for (int j = 0; j < GS; ++j)
    for (int v = 0; v < NV; ++v) a[j][v] = Vec::load(acc + j * D + v * W);
  for (int t = 0; t < n; ++t) {
    Vec x[NV];
    for (int v = 0; v < NV; ++v) x[v] = Vec::load(vp[t] + off + v * W);
    for (int j = 0; j < GS; ++j) {
      Vec pj = Vec::set1(p[j * kDecodeChunk + t]);
      for (int v = 0; v < NV; ++v) a[j][v] = fmadd(pj, x[v], a[j][v]);
    }
  }
  for (int j = 0; j < GS; ++j)
    for (int v = 0; v < NV; ++v) a[j][v].store(acc + j * D + v * W);
}

// One chunk of n tokens for the GS query heads of one kv head: scores s[j][t] = q_j . k_t, the online-softmax
// update of (m, l, acc) and acc_j += sum_t p[j][t] v_t. kp/vp hold the rows of kv head 0; koff/voff step to this
// kv head. qf, acc: [GS][D]; s: [GS][kDecodeChunk].
template <typename T, int GS>
void decode_chunk(const float* qf, int D, const void* const* kpv, const void* const* vpv, int64_t koff,
                  int64_t voff, int n, float* s, float* m, float* l, float* acc, const void* const* kpn,
                  const void* const* vpn, int nn) {
  const T* const* kp = reinterpret_cast<const T* const*>(kpv);
  const T* const* vp = reinterpret_cast<const T* const*>(vpv);
  const int Dv = D / W * W;
  // prefetch this kv head's rows of the next chunk into L2 while this one computes (block ids jump)
  {
    const int64_t bytes = static_cast<int64_t>(D) * sizeof(T);
    for (int t = 0; t < nn; ++t) {
      const char* kr = reinterpret_cast<const char*>(reinterpret_cast<const T*>(kpn[t]) + koff);
      const char* vr = reinterpret_cast<const char*>(reinterpret_cast<const T*>(vpn[t]) + voff);
      for (int64_t b = 0; b < bytes; b += 64) {
        __builtin_prefetch(kr + b, 0, 2);
        __builtin_prefetch(vr + b, 0, 2);
      }
    }
  }
  int t = 0;
  if constexpr (GS <= 4) {  // two tokens at a time: twice the independent FMA chains, q loaded once for both
    for (; t + 1 < n; t += 2) {
      const T* k0 = kp[t] + koff;
      const T* k1 = kp[t + 1] + koff;
      Vec a0[GS], a1[GS];
      for (int j = 0; j < GS; ++j) a0[j] = a1[j] = Vec::zero();
      for (int d = 0; d < Dv; d += W) {
        Vec x0 = Vec::load(k0 + d), x1 = Vec::load(k1 + d);
        for (int j = 0; j < GS; ++j) {
          Vec qv = Vec::load(qf + j * D + d);
          a0[j] = fmadd(qv, x0, a0[j]);
          a1[j] = fmadd(qv, x1, a1[j]);
        }
      }
      for (int j = 0; j < GS; ++j) {
        float y0 = a0[j].reduce_add(), y1 = a1[j].reduce_add();
        for (int d = Dv; d < D; ++d) {
          y0 += qf[j * D + d] * to_float(k0[d]);
          y1 += qf[j * D + d] * to_float(k1[d]);
        }
        s[j * kDecodeChunk + t] = y0;
        s[j * kDecodeChunk + t + 1] = y1;
      }
    }
  }
  for (; t < n; ++t) {
    const T* kr = kp[t] + koff;
    Vec a[GS];
    for (int j = 0; j < GS; ++j) a[j] = Vec::zero();
    for (int d = 0; d < Dv; d += W) {
      Vec kv = Vec::load(kr + d);
      for (int j = 0; j < GS; ++j) a[j] = fmadd(Vec::load(qf + j * D + d), kv, a[j]);
    }
    for (int j = 0; j < GS; ++j) {
      float x = a[j].reduce_add();
      for (int d = Dv; d < D; ++d) x += qf[j * D + d] * to_float(kr[d]);
      s[j * kDecodeChunk + t] = x;
    }
  }
  const int nv = n / W * W;
  const Vec ninf = Vec::set1(kNegInf);
  for (int j = 0; j < GS; ++j) {
    float* sj = s + j * kDecodeChunk;
    Vec mx = ninf;
    for (int t = 0; t < nv; t += W) mx = vmax(mx, Vec::load(sj + t));
    if (nv < n) mx = vmax(mx, keep_first(Vec::load(sj + nv), n - nv, ninf));
    const float m_new = std::max(m[j], mx.reduce_max());
    const float corr = std::exp(m[j] - m_new);  // 0 on the first chunk (m = -inf)
    const Vec mv = Vec::set1(m_new);
    Vec sum = Vec::zero();
    for (int t = 0; t < nv; t += W) {
      Vec p = vexp(Vec::load(sj + t) - mv);
      p.store(sj + t);
      sum = sum + p;
    }
    if (nv < n) {
      Vec p = keep_first(vexp(Vec::load(sj + nv) - mv), n - nv, Vec::zero());
      p.store(sj + nv);
      sum = sum + p;
    }
    l[j] = l[j] * corr + sum.reduce_add();
    m[j] = m_new;
    if (corr != 1.f) {
      float* aj = acc + j * D;
      for (int d = 0; d < D; ++d) aj[d] *= corr;
    }
  }
  // several vectors of D per step when GS is small, so there are enough independent FMA chains
  constexpr int NV = GS <= 2 ? 4 : GS <= 4 ? 2 : 1;
  int d = 0;
  for (; d + NV * W <= Dv; d += NV * W) decode_pv<T, GS, NV>(vp, voff + d, n, s, acc + d, D);
  for (; d < Dv; d += W) decode_pv<T, GS, 1>(vp, voff + d, n, s, acc + d, D);
  for (int d = Dv; d < D; ++d) {
    for (int j = 0; j < GS; ++j) {
      float x = acc[j * D + d];
      for (int t = 0; t < n; ++t) x += s[j * kDecodeChunk + t] * to_float(vp[t][voff + d]);
      acc[j * D + d] = x;
    }
  }
}

using DecodeChunkFn = void (*)(const float*, int, const void* const*, const void* const*, int64_t, int64_t, int,
                               float*, float*, float*, float*, const void* const*, const void* const*, int);

template <typename T>
DecodeChunkFn decode_chunk_fn(int gs) {
  switch (gs) {
    case 1: return decode_chunk<T, 1>;
    case 2: return decode_chunk<T, 2>;
    case 3: return decode_chunk<T, 3>;
    case 4: return decode_chunk<T, 4>;
    case 5: return decode_chunk<T, 5>;
    case 6: return decode_chunk<T, 6>;
    case 7: return decode_chunk<T, 7>;
    default: return decode_chunk<T, 8>;
  }
}

void check_tables(const at::Tensor& block_tables, const int32_t* ctx, int64_t n, int64_t bs, int64_t num_blocks,
                  const char* what) {
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t mb = block_tables.size(1);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ctx[i] >= 0, what, ": negative context length ", ctx[i], " for sequence ", i);
    const int64_t nbl = (ctx[i] + bs - 1) / bs;
    TORCH_CHECK(nbl <= mb, what, ": context length ", ctx[i], " of sequence ", i, " needs ", nbl,
                " blocks but block_tables has ", mb, " columns");
    for (int64_t b = 0; b < nbl; ++b) {
      const int32_t id = bt[i * mb + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, what, ": block id ", id, " of sequence ", i, " (block ", b,
                  ") is outside the cache's ", num_blocks, " blocks");
    }
  }
}

void check_common(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const char* what) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), what,
              ": CPU tensors only");
  TORCH_CHECK(q.dim() == 3, what, ": q must be [tokens, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), what,
              ": k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), what,
              ": q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, what,
              ": float32 and bfloat16 only");
  TORCH_CHECK(q.size(2) == k_cache.size(3), what, ": head_dim of q and cache differ");
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0, what,
              ": num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, what,
              ": head_dim must be the contiguous dimension");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, what,
              ": block_tables must be a 2-D int32 tensor");
}

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_tables, const int32_t* ctx, double scale_d, at::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), KVH = k_cache.size(2), bs = k_cache.size(1);
  const int D = static_cast<int>(q.size(2));
  const int64_t G = H / KVH;
  const float scale = static_cast<float>(scale_d);
  const CacheView<T> K = cache_view<T>(k_cache), V = cache_view<T>(v_cache);
  const T* qp = q.data_ptr<T>();
  const int64_t q_ts = q.stride(0), q_hs = q.stride(1);
  T* op = out.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t mb = block_tables.size(1);

  // One item per sequence (all its kv heads, reading each block front to back); the context is split into
  // several items when there are too few sequences to keep the threads busy, and the splits merged after.
  const int nt = threads_available();
  int64_t max_ctx = 0;
  for (int64_t i = 0; i < n; ++i) max_ctx = std::max<int64_t>(max_ctx, ctx[i]);
  int64_t nsplit = 1;
  if (nt > 1 && n < 4 * nt)
    nsplit = std::max<int64_t>(1, std::min<int64_t>({(4 * nt + n - 1) / n, max_ctx / 128, kMaxSplit}));
  // split partial states: [n, nsplit, H] m and l, [n, nsplit, H, D] acc
  std::vector<float> part_m, part_l, part_acc;
  if (nsplit > 1) {
    part_m.resize(n * nsplit * H);
    part_l.resize(n * nsplit * H);
    part_acc.resize(n * nsplit * H * D);
  }
  std::vector<DecodeScratch> scratch(std::max(1, nt));
  auto init = [&](int t) {
    DecodeScratch& sc = scratch[t];
    sc.qf.resize(H * D);
    sc.acc.resize(H * D);
    sc.m.resize(H);
    sc.l.resize(H);
    sc.s.resize(kMaxGroup * kDecodeChunk);
    sc.kp.resize(2 * kDecodeChunk);
    sc.vp.resize(2 * kDecodeChunk);
  };
  // longest contexts first, so the dynamic schedule ends balanced
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ctx[a] > ctx[b]; });
  auto body = [&](int64_t item, int t) {
    DecodeScratch& sc = scratch[t];
    const int64_t i = order[item / nsplit], sp = item % nsplit;
    const int64_t L = ctx[i];
    const int64_t per = round_up((L + nsplit - 1) / nsplit, 16);
    const int64_t t0 = std::min(L, sp * per), t1 = std::min(L, t0 + per);
    float* m = nsplit > 1 ? part_m.data() + (i * nsplit + sp) * H : sc.m.data();
    float* l = nsplit > 1 ? part_l.data() + (i * nsplit + sp) * H : sc.l.data();
    float* acc = nsplit > 1 ? part_acc.data() + (i * nsplit + sp) * H * D : sc.acc.data();
    for (int64_t h = 0; h < H; ++h) {
      m[h] = kNegInf;
      l[h] = 0.f;
    }
    std::fill(acc, acc + H * D, 0.f);
    if (t0 < t1) {
      float* qf = sc.qf.data();
      for (int64_t h = 0; h < H; ++h) {
        const T* qr = qp + i * q_ts + h * q_hs;
        for (int d = 0; d < D; ++d) qf[h * D + d] = to_float(qr[d]) * scale;
      }
      const int32_t* btab = bt + i * mb;
      auto rows = [&](int64_t c0, const void** kp, const void** vp) {
        const int nc = static_cast<int>(std::min<int64_t>(kDecodeChunk, t1 - c0));
        int64_t blk_i = c0 / bs, off = c0 % bs;
        for (int c = 0; c < nc; ++c) {
          const int64_t blk = btab[blk_i];
          kp[c] = K.row(blk, off, 0);
          vp[c] = V.row(blk, off, 0);
          if (++off == bs) { off = 0; ++blk_i; }
        }
        return nc;
      };
      const void** kp = sc.kp.data();
      const void** vp = sc.vp.data();
      const void** kpn = kp + kDecodeChunk;
      const void** vpn = vp + kDecodeChunk;
      int nc = rows(t0, kp, vp);
      for (int64_t c0 = t0; c0 < t1; c0 += kDecodeChunk) {
        const int nn = c0 + kDecodeChunk < t1 ? rows(c0 + kDecodeChunk, kpn, vpn) : 0;
        for (int64_t g = 0; g < KVH; ++g) {
          for (int64_t j0 = 0; j0 < G; j0 += kMaxGroup) {
            const int64_t h0 = g * G + j0;
            const int gs = static_cast<int>(std::min<int64_t>(kMaxGroup, G - j0));
            decode_chunk_fn<T>(gs)(qf + h0 * D, D, kp, vp, g * K.sh, g * V.sh, nc, sc.s.data(), m + h0, l + h0,
                                   acc + h0 * D, kpn, vpn, j0 == 0 ? nn : 0);
          }
        }
        std::swap(kp, kpn);
        std::swap(vp, vpn);
        nc = nn;
      }
    }
    if (nsplit == 1) {
      T* o = op + i * H * D;
      for (int64_t h = 0; h < H; ++h) {
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // an empty context gives zeros
        for (int d = 0; d < D; ++d) o[h * D + d] = from_float<T>(acc[h * D + d] * inv);
      }
    }
  };
  parallel_items(n * nsplit, init, body);
  if (nsplit > 1) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        float M = kNegInf;
        for (int64_t s = 0; s < nsplit; ++s) M = std::max(M, part_m[(i * nsplit + s) * H + h]);
        T* o = op + (i * H + h) * D;
        if (M == kNegInf) {
          for (int d = 0; d < D; ++d) o[d] = from_float<T>(0.f);
          continue;
        }
        float w[kMaxSplit];
        float Ls = 0.f;
        for (int64_t s = 0; s < nsplit; ++s) {
          const float ls = part_l[(i * nsplit + s) * H + h];
          w[s] = ls > 0.f ? std::exp(part_m[(i * nsplit + s) * H + h] - M) : 0.f;
          Ls += w[s] * ls;
        }
        const float inv = 1.f / Ls;
        for (int d = 0; d < D; ++d) {
          float x = 0.f;
          for (int64_t s = 0; s < nsplit; ++s)
            if (w[s] != 0.f) x += w[s] * part_acc[((i * nsplit + s) * H + h) * D + d];
          o[d] = from_float<T>(x * inv);
        }
      }
    }
  }
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables_in, const at::Tensor& context_lens_in,
                                  double scale) {
  const char* what = "nano_pd::paged_attention_decode";
  check_common(q, k_cache, v_cache, block_tables_in, what);
  at::Tensor block_tables = block_tables_in.contiguous();
  at::Tensor context_lens = context_lens_in.contiguous();
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 &&
                  context_lens.size(0) == q.size(0) && block_tables.size(0) == q.size(0),
              what, ": context_lens must be int32 [n] and block_tables [n, max_blocks]");
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  check_tables(block_tables, ctx, q.size(0), k_cache.size(1), k_cache.size(0), what);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return out;
  if (q.scalar_type() == at::kFloat)
    decode_impl<float>(q, k_cache, v_cache, block_tables, ctx, scale, out);
  else
    decode_impl<bf16>(q, k_cache, v_cache, block_tables, ctx, scale, out);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------------------------
constexpr int kKeyChunk = 64;  // keys per online-softmax step

// C[MR x NV*W] = sum_k A[i][k] * B[k][0:NV*W]; A rows by pointer (K values each), B row-major (ldb).
template <int MR, int NV>
inline void gemm_kq(const float* const* arows, int K, const float* B, int64_t ldb, float* C, int64_t ldc) {
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec::zero();
  for (int k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(B + k * ldb + v * W);
    for (int i = 0; i < MR; ++i) {
      Vec a = Vec::set1(arows[i][k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = fmadd(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v].store(C + i * ldc + v * W);
}

// C[MR x NV*W] += sum_k A[k*lda + i] * Brow_k[0:NV*W]; B rows by pointer (already offset to the column tile).
template <int MR, int NV>
inline void gemm_pv(const float* A, int64_t lda, int K, const float* const* brows, int64_t boff, float* C,
                    int64_t ldc) {
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec::load(C + i * ldc + v * W);
  for (int k = 0; k < K; ++k) {
    Vec b[NV];
    const float* br = brows[k] + boff;
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(br + v * W);
    const float* ak = A + k * lda;
    for (int i = 0; i < MR; ++i) {
      Vec a = Vec::set1(ak[i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = fmadd(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v].store(C + i * ldc + v * W);
}

template <int NV, int MR = kMR>
inline void gemm_kq_rows(int mr, const float* const* arows, int K, const float* B, int64_t ldb, float* C,
                         int64_t ldc) {
  if constexpr (MR == 0) {
    return;
  } else {
    if (mr == MR) return gemm_kq<MR, NV>(arows, K, B, ldb, C, ldc);
    return gemm_kq_rows<NV, MR - 1>(mr, arows, K, B, ldb, C, ldc);
  }
}

template <int NV, int MR = kMR>
inline void gemm_pv_rows(int mr, const float* A, int64_t lda, int K, const float* const* brows, int64_t boff,
                         float* C, int64_t ldc) {
  if constexpr (MR == 0) {
    return;
  } else {
    if (mr == MR) return gemm_pv<MR, NV>(A, lda, K, brows, boff, C, ldc);
    return gemm_pv_rows<NV, MR - 1>(mr, A, lda, K, brows, boff, C, ldc);
  }
}

struct PrefillItem {
  int32_t seq, kvh, q0, nq;  // query rows [q0, q0 + nq) of the sequence's chunk
  int64_t cost;
};

struct PrefillScratch {
  std::vector<float> qt, o, s, kbuf, vbuf, m, l, corr, pos, zero;
  std::vector<const float*> kp, vp;
};

template <typename T>
void prefill_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const int32_t* cu, const int32_t* ctx, int64_t S, double scale_d,
                  at::Tensor& out) {
  const int64_t H = q.size(1), KVH = k_cache.size(2), bs = k_cache.size(1);
  const int D = static_cast<int>(q.size(2));
  const int G = static_cast<int>(H / KVH);
  const float scale = static_cast<float>(scale_d);
  const CacheView<T> Kc = cache_view<T>(k_cache), Vc = cache_view<T>(v_cache);
  const T* qp = q.data_ptr<T>();
  const int64_t q_ts = q.stride(0), q_hs = q.stride(1);
  T* op = out.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t mb = block_tables.size(1);
  const int Dp = static_cast<int>(round_up(D, W));
  // fp32 K/V rows are used in place; bf16 rows (and fp32 V rows when D is not a multiple of W) are widened into
  // per-thread buffers first
  constexpr bool kWiden = !std::is_same<T, float>::value;
  const bool pack_v = kWiden || (D % W != 0);

  // query positions per tile: up to 64, and up to 192 rows (G heads each); measured best on a 2-core Zen 3
  const int QT = std::max(1, std::min(64, 192 / G));
  const int Mmax = QT * G;
  const int Mp = static_cast<int>(round_up(Mmax, W));
  const int KCp = static_cast<int>(round_up(kKeyChunk, kMR));

  std::vector<PrefillItem> items;
  for (int64_t s = 0; s < S; ++s) {
    const int32_t nn = cu[s + 1] - cu[s];
    const int64_t p0 = ctx[s] - nn;
    for (int32_t q0 = 0; q0 < nn; q0 += QT) {
      const int32_t nq = std::min(QT, nn - q0);
      for (int64_t g = 0; g < KVH; ++g)
        items.push_back({static_cast<int32_t>(s), static_cast<int32_t>(g), q0, nq, (p0 + q0 + nq) * nq});
    }
  }
  // most expensive first, so the dynamic schedule ends balanced
  std::stable_sort(items.begin(), items.end(),
                   [](const PrefillItem& a, const PrefillItem& b) { return a.cost > b.cost; });

  const int nt = threads_available();
  std::vector<PrefillScratch> scratch(std::max(1, nt));
  auto init = [&](int t) {
    PrefillScratch& sc = scratch[t];
    sc.qt.resize(static_cast<size_t>(D) * Mp);
    sc.o.resize(static_cast<size_t>(Mp) * Dp);
    sc.s.resize(static_cast<size_t>(KCp) * Mp);
    sc.kbuf.resize(kWiden ? static_cast<size_t>(kKeyChunk) * Dp : 0);
    sc.vbuf.resize(pack_v ? static_cast<size_t>(kKeyChunk) * Dp : 0);
    sc.m.resize(Mp);
    sc.l.resize(Mp);
    sc.corr.resize(Mp);
    sc.pos.resize(Mp);
    sc.zero.assign(Dp, 0.f);
    sc.kp.resize(KCp);
    sc.vp.resize(kKeyChunk);
  };

  auto body = [&](int64_t it, int t) {
    PrefillScratch& sc = scratch[t];
    const PrefillItem& item = items[it];
    const int64_t s = item.seq, g = item.kvh;
    const int32_t nn = cu[s + 1] - cu[s];
    const int64_t p0 = static_cast<int64_t>(ctx[s]) - nn + item.q0;  // position of the tile's first query
    const int M = item.nq * G;
    const int Mv = static_cast<int>(round_up(M, W));
    float* qt = sc.qt.data();
    float* O = sc.o.data();
    float* St = sc.s.data();
    float* m = sc.m.data();
    float* l = sc.l.data();
    float* corr = sc.corr.data();
    float* pos = sc.pos.data();
    // Q^T tile (scaled): qt[d][r], r = query * G + head-in-group; padded rows are 0 and sit at the last position
    for (int r = 0; r < Mv; ++r) {
      if (r < M) {
        const T* qr = qp + (cu[s] + item.q0 + r / G) * q_ts + (g * G + r % G) * q_hs;
        for (int d = 0; d < D; ++d) qt[d * Mv + r] = to_float(qr[d]) * scale;
        pos[r] = static_cast<float>(p0 + r / G);
      } else {
        for (int d = 0; d < D; ++d) qt[d * Mv + r] = 0.f;
        pos[r] = static_cast<float>(p0 + item.nq - 1);
      }
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    std::fill(O, O + static_cast<size_t>(Mv) * Dp, 0.f);
    const int64_t kend = p0 + item.nq;  // keys [0, kend) are visible to some row
    const int32_t* btab = bt + s * mb;
    for (int64_t c0 = 0; c0 < kend; c0 += kKeyChunk) {
      const int nk = static_cast<int>(std::min<int64_t>(kKeyChunk, kend - c0));
      // row pointers (widened copies for bf16)
      {
        int64_t blk_i = c0 / bs, off = c0 % bs;
        for (int c = 0; c < nk; ++c) {
          const int64_t blk = btab[blk_i];
          const T* kr = Kc.row(blk, off, g);
          const T* vr = Vc.row(blk, off, g);
          if constexpr (kWiden) {
            float* kb = sc.kbuf.data() + static_cast<size_t>(c) * Dp;
            int d = 0;
            for (; d + W <= D; d += W) Vec::load(kr + d).store(kb + d);
            for (; d < D; ++d) kb[d] = to_float(kr[d]);
            sc.kp[c] = kb;
          } else {
            sc.kp[c] = reinterpret_cast<const float*>(kr);
          }
          if (pack_v) {
            float* vb = sc.vbuf.data() + static_cast<size_t>(c) * Dp;
            int d = 0;
            for (; d + W <= D; d += W) Vec::load(vr + d).store(vb + d);
            for (; d < D; ++d) vb[d] = to_float(vr[d]);
            for (; d < Dp; ++d) vb[d] = 0.f;
            sc.vp[c] = vb;
          } else {
            sc.vp[c] = reinterpret_cast<const float*>(vr);
          }
          if (++off == bs) { off = 0; ++blk_i; }
        }
        for (int c = nk; c < KCp; ++c) sc.kp[c] = sc.zero.data();
      }
      // S^T[c][r] = k_c . q_r for the (key rows x query columns) tiles some row can see
      for (int j0 = 0; j0 < Mv;) {
        const int nv = (Mv - j0 >= 2 * W) ? 2 : 1;
        const int jl = std::min(j0 + nv * W, M) - 1;  // last real row of the column tile
        const int64_t kl = std::min<int64_t>(nk, static_cast<int64_t>(pos[std::max(jl, j0)]) - c0 + 1);
        for (int i0 = 0; i0 < kl; i0 += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, kl - i0));
          if (nv == 2)
            gemm_kq_rows<2>(mr, sc.kp.data() + i0, D, qt + j0, Mv, St + static_cast<size_t>(i0) * Mv + j0, Mv);
          else
            gemm_kq_rows<1>(mr, sc.kp.data() + i0, D, qt + j0, Mv, St + static_cast<size_t>(i0) * Mv + j0, Mv);
        }
        j0 += nv * W;
      }
      // column-wise online softmax: lane r sees keys c with c0 + c <= pos[r]
      const Vec ninf = Vec::set1(kNegInf);
      for (int r0 = 0; r0 < Mv; r0 += W) {
        const Vec pv = Vec::load(pos + r0);
        const float pmin = pos[r0], pmax = pos[std::min(r0 + W, Mv) - 1];  // pos is non-decreasing in r
        const int cl = static_cast<int>(std::min<int64_t>(nk, static_cast<int64_t>(pmax) - c0 + 1));
        const int cfull = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(cl, static_cast<int64_t>(pmin) - c0 + 1)));
        Vec mx = ninf;
        for (int c = 0; c < cfull; ++c) mx = vmax(mx, Vec::load(St + static_cast<size_t>(c) * Mv + r0));
        for (int c = cfull; c < cl; ++c)
          mx = vmax(mx, keep_where_gt(Vec::load(St + static_cast<size_t>(c) * Mv + r0), pv,
                                      static_cast<float>(c0 + c) - 0.5f, ninf));
        const Vec m_old = Vec::load(m + r0);
        const Vec m_new = vmax(m_old, mx);
        Vec sum = Vec::zero();
        for (int c = 0; c < cfull; ++c) {
          float* sp = St + static_cast<size_t>(c) * Mv + r0;
          Vec p = vexp(Vec::load(sp) - m_new);
          p.store(sp);
          sum = sum + p;
        }
        for (int c = cfull; c < cl; ++c) {
          float* sp = St + static_cast<size_t>(c) * Mv + r0;
          Vec p = keep_where_gt(vexp(Vec::load(sp) - m_new), pv, static_cast<float>(c0 + c) - 0.5f, Vec::zero());
          p.store(sp);
          sum = sum + p;
        }
        // rows that see a key of this chunk: cl > 0 whenever some lane does (pmax >= c0 always here)
        for (int c = std::max(cl, 0); c < nk; ++c) Vec::zero().store(St + static_cast<size_t>(c) * Mv + r0);
        const Vec cr = vexp(m_old - m_new);  // m_old = -inf on the first chunk -> 0
        (Vec::load(l + r0) * cr + sum).store(l + r0);
        m_new.store(m + r0);
        cr.store(corr + r0);
      }
      if (c0 > 0) {
        for (int r = 0; r < M; ++r) {
          const float cr = corr[r];
          if (cr != 1.f) {
            const Vec cv = Vec::set1(cr);
            float* orow = O + static_cast<size_t>(r) * Dp;
            for (int d = 0; d < Dp; d += W) (Vec::load(orow + d) * cv).store(orow + d);
          }
        }
      }
      // O[r][:] += sum_c P^T[c][r] v_c over the keys each row block can see
      for (int i0 = 0; i0 < M; i0 += kMR) {
        const int mr = std::min(kMR, M - i0);
        const int kb = static_cast<int>(std::min<int64_t>(nk, static_cast<int64_t>(pos[i0 + mr - 1]) - c0 + 1));
        if (kb <= 0) continue;
        for (int j0 = 0; j0 < Dp;) {
          const int nv = (Dp - j0 >= 2 * W) ? 2 : 1;
          if (nv == 2)
            gemm_pv_rows<2>(mr, St + i0, Mv, kb, sc.vp.data(), j0, O + static_cast<size_t>(i0) * Dp + j0, Dp);
          else
            gemm_pv_rows<1>(mr, St + i0, Mv, kb, sc.vp.data(), j0, O + static_cast<size_t>(i0) * Dp + j0, Dp);
          j0 += nv * W;
        }
      }
    }
    for (int r = 0; r < M; ++r) {
      T* orow = op + ((cu[s] + item.q0 + r / G) * H + g * G + r % G) * D;
      const float inv = 1.f / l[r];
      const float* srow = O + static_cast<size_t>(r) * Dp;
      for (int d = 0; d < D; ++d) orow[d] = from_float<T>(srow[d] * inv);
    }
  };
  parallel_items(static_cast<int64_t>(items.size()), init, body);
}

at::Tensor paged_attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables_in, const at::Tensor& cu_seqlens_in,
                                   const at::Tensor& context_lens_in, double scale) {
  const char* what = "nano_pd::paged_attention_prefill";
  check_common(q, k_cache, v_cache, block_tables_in, what);
  at::Tensor block_tables = block_tables_in.contiguous();
  at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  at::Tensor context_lens = context_lens_in.contiguous();
  const int64_t S = context_lens.size(0);
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 &&
                  cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 && cu_seqlens.size(0) == S + 1 &&
                  block_tables.size(0) == S,
              what, ": need cu_seqlens_q int32 [S+1], context_lens int32 [S], block_tables [S, max_blocks]");
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[S] == q.size(0), what, ": cu_seqlens_q must run from 0 to the number of queries");
  for (int64_t s = 0; s < S; ++s) {
    const int32_t nn = cu[s + 1] - cu[s];
    TORCH_CHECK(nn >= 0 && nn <= ctx[s], what, ": sequence ", s, " has ", nn, " queries but context length ",
                ctx[s]);
  }
  check_tables(block_tables, ctx, S, k_cache.size(1), k_cache.size(0), what);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return out;
  if (q.scalar_type() == at::kFloat)
    prefill_impl<float>(q, k_cache, v_cache, block_tables, cu, ctx, S, scale, out);
  else
    prefill_impl<bf16>(q, k_cache, v_cache, block_tables, cu, ctx, S, scale, out);
  return out;
}

std::string paged_attention_isa() { return NPD_ISA; }

}  // namespace nano_pd_paged

TORCH_LIBRARY_FRAGMENT(nano_pd, m) {
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "float scale) -> Tensor");
  m.def(
      "paged_attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_seqlens_q, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def("paged_attention_isa() -> str", &nano_pd_paged::paged_attention_isa);
}

TORCH_LIBRARY_IMPL(nano_pd, CPU, m) {
  m.impl("paged_attention_decode", &nano_pd_paged::paged_attention_decode);
  m.impl("paged_attention_prefill", &nano_pd_paged::paged_attention_prefill);
}
