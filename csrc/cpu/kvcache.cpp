// CPU kernels for the KV-cache ops (KIVI: keys quantized per channel over groups of tokens, values
// per token over groups of channels; layout in engram_kernels/ops/kvcache/naive.py). fp32 compute;
// inputs arrive as fp32 (the Python wrapper converts), scales and zero points are fp16.
//
// decode_attention never dequantizes the cache into memory: it streams the packed codes, one key
// group at a time, folding each group's scale into the query (q.k = sum_c (q_c s_c) code_c + sum_c
// q_c z_c) and each token's value scale into its probability (p.v = sum_j (p_j s_j) code_j + sum_j
// p_j z_j per value group), and runs an online softmax. Work items are (batch, KV head, split of the
// tokens), so even batch 1 with few KV heads keeps every core busy; the splits are merged at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kResidualBlock = 64;  // fp tokens per softmax block in the residual window

inline float half_to_float(at::Half h) { return static_cast<float>(h); }

// dst[i] = src[i] as float for i < n, 8 at a time where F16C is there.
inline void halves_to_floats(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* x, float* acc, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += w * x[i];
}

// Planar packing: byte j of a row holds channels j, j + P, j + 2P, ... (P bytes per row).
template <int BITS>
inline void unpack_row(const uint8_t* src, float* dst, int64_t bytes) {
  constexpr int kPer = 8 / BITS;
  constexpr int kMask = (1 << BITS) - 1;
#if defined(__AVX2__)
  if (bytes % 8 == 0) {  // 8 bytes -> kPer runs of 8 floats
    const __m256i mask = _mm256_set1_epi32(kMask);
    for (int64_t j = 0; j < bytes; j += 8) {
      const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
      for (int i = 0; i < kPer; ++i)
        _mm256_storeu_ps(dst + i * bytes + j,
                         _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(x, BITS * i), mask)));
    }
    return;
  }
#endif
  for (int i = 0; i < kPer; ++i) {
    float* out = dst + i * bytes;
#pragma omp simd
    for (int64_t j = 0; j < bytes; ++j) out[j] = static_cast<float>((src[j] >> (BITS * i)) & kMask);
  }
}

template <int BITS>
inline void pack_row(const uint8_t* codes, uint8_t* dst, int64_t bytes) {
  constexpr int kPer = 8 / BITS;
  for (int64_t j = 0; j < bytes; ++j) {
    int byte = 0;
    for (int i = 0; i < kPer; ++i) byte |= codes[i * bytes + j] << (BITS * i);
    dst[j] = static_cast<uint8_t>(byte);
  }
}

// Asymmetric min/max parameters, rounded to fp16 as stored; codes are computed from the rounded ones.
struct QuantParams {
  at::Half scale, zero;
  float inv_scale, zero_f;
};

inline QuantParams quant_params(float lo, float hi, int levels) {
  QuantParams p;
  p.scale = at::Half((hi - lo) / levels);
  p.zero = at::Half(lo);
  float s = half_to_float(p.scale);
  p.inv_scale = s > 0.f ? s : 1.f;  // a divisor: the reference divides, and so do we (same rounding)
  p.zero_f = half_to_float(p.zero);
  return p;
}

inline uint8_t quant_code(float x, const QuantParams& p, int levels) {
  float c = std::nearbyint((x - p.zero_f) / p.inv_scale);
  return static_cast<uint8_t>(std::min(std::max(c, 0.f), static_cast<float>(levels)));
}

void check_cpu(const torch::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has the wrong dtype ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---- quantize ----------------------------------------------------------------------------------

template <int BITS>
void quantize_keys_impl(const float* x, uint8_t* codes, at::Half* scale, at::Half* zero, int64_t bh, int64_t t,
                        int64_t d, int64_t group) {
  const int levels = (1 << BITS) - 1;
  const int64_t bytes = d * BITS / 8, n_groups = (t + group - 1) / group;
  at::parallel_for(0, bh * n_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lo(d), hi(d);
    std::vector<QuantParams> params(d);
    std::vector<uint8_t> row(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / n_groups, g = item % n_groups;
      const int64_t t0 = g * group, t1 = std::min(t0 + group, t);
      const float* src = x + head * t * d;
      std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
      std::fill(hi.begin(), hi.end(), kNegInf);
      for (int64_t tok = t0; tok < t1; ++tok)
        for (int64_t c = 0; c < d; ++c) {
          lo[c] = std::min(lo[c], src[tok * d + c]);
          hi[c] = std::max(hi[c], src[tok * d + c]);
        }
      for (int64_t c = 0; c < d; ++c) {
        params[c] = quant_params(lo[c], hi[c], levels);
        scale[(head * n_groups + g) * d + c] = params[c].scale;
        zero[(head * n_groups + g) * d + c] = params[c].zero;
      }
      for (int64_t tok = t0; tok < t1; ++tok) {
        for (int64_t c = 0; c < d; ++c) row[c] = quant_code(src[tok * d + c], params[c], levels);
        pack_row<BITS>(row.data(), codes + (head * t + tok) * bytes, bytes);
      }
    }
  });
}

template <int BITS>
void quantize_values_impl(const float* x, uint8_t* codes, at::Half* scale, at::Half* zero, int64_t rows,
                          int64_t d, int64_t gv) {
  const int levels = (1 << BITS) - 1;
  const int64_t bytes = d * BITS / 8, n_groups = d / gv;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(d);
    for (int64_t r = begin; r < end; ++r) {
      const float* src = x + r * d;
      for (int64_t g = 0; g < n_groups; ++g) {
        const float* v = src + g * gv;
        float lo = v[0], hi = v[0];
        for (int64_t c = 1; c < gv; ++c) lo = std::min(lo, v[c]), hi = std::max(hi, v[c]);
        QuantParams p = quant_params(lo, hi, levels);
        scale[r * n_groups + g] = p.scale;
        zero[r * n_groups + g] = p.zero;
        for (int64_t c = 0; c < gv; ++c) row[g * gv + c] = quant_code(v[c], p, levels);
      }
      pack_row<BITS>(row.data(), codes + r * bytes, bytes);
    }
  });
}

std::vector<torch::Tensor> quantize_keys(torch::Tensor keys, int64_t bits, int64_t group) {
  check_cpu(keys, "keys", at::kFloat);
  const int64_t b = keys.size(0), h = keys.size(1), t = keys.size(2), d = keys.size(3);
  const int64_t n_groups = (t + group - 1) / group;
  auto codes = torch::empty({b, h, t, d * bits / 8}, keys.options().dtype(at::kByte));
  auto scale = torch::empty({b, h, n_groups, d}, keys.options().dtype(at::kHalf));
  auto zero = torch::empty_like(scale);
  auto run = bits == 4 ? quantize_keys_impl<4> : quantize_keys_impl<2>;
  run(keys.data_ptr<float>(), codes.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), zero.data_ptr<at::Half>(),
      b * h, t, d, group);
  return {codes, scale, zero};
}

std::vector<torch::Tensor> quantize_values(torch::Tensor values, int64_t bits, int64_t group) {
  check_cpu(values, "values", at::kFloat);
  const int64_t b = values.size(0), h = values.size(1), t = values.size(2), d = values.size(3);
  const int64_t gv = std::min(group, d);
  auto codes = torch::empty({b, h, t, d * bits / 8}, values.options().dtype(at::kByte));
  auto scale = torch::empty({b, h, t, d / gv}, values.options().dtype(at::kHalf));
  auto zero = torch::empty_like(scale);
  auto run = bits == 4 ? quantize_values_impl<4> : quantize_values_impl<2>;
  run(values.data_ptr<float>(), codes.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), zero.data_ptr<at::Half>(),
      b * h * t, d, gv);
  return {codes, scale, zero};
}

// ---- dequantize --------------------------------------------------------------------------------

// Row r of codes (bh * t rows) -> out row r; key rows use their group's per-channel parameters,
// value rows their own per-channel-group ones.
template <int BITS, bool KEYS>
void dequantize_impl(const uint8_t* codes, const at::Half* scale, const at::Half* zero, float* out, int64_t bh,
                     int64_t t, int64_t d, int64_t group) {
  const int64_t bytes = d * BITS / 8, n_groups = (t + group - 1) / group, gv = std::min(group, d);
  at::parallel_for(0, bh * t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = out + r * d;
      unpack_row<BITS>(codes + r * bytes, row, bytes);
      if (KEYS) {
        const int64_t base = ((r / t) * n_groups + (r % t) / group) * d;
        for (int64_t c = 0; c < d; ++c) row[c] = row[c] * half_to_float(scale[base + c]) + half_to_float(zero[base + c]);
      } else {
        for (int64_t g = 0; g < d / gv; ++g) {
          const float s = half_to_float(scale[r * (d / gv) + g]), z = half_to_float(zero[r * (d / gv) + g]);
          for (int64_t c = g * gv; c < (g + 1) * gv; ++c) row[c] = row[c] * s + z;
        }
      }
    }
  });
}

torch::Tensor dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t bits, int64_t group,
                         bool keys) {
  check_cpu(codes, "codes", at::kByte);
  check_cpu(scale, "scale", at::kHalf);
  check_cpu(zero, "zero", at::kHalf);
  const int64_t b = codes.size(0), h = codes.size(1), t = codes.size(2), d = codes.size(3) * 8 / bits;
  auto out = torch::empty({b, h, t, d}, codes.options().dtype(at::kFloat));
  using Fn = void (*)(const uint8_t*, const at::Half*, const at::Half*, float*, int64_t, int64_t, int64_t, int64_t);
  Fn run = bits == 4 ? (keys ? dequantize_impl<4, true> : dequantize_impl<4, false>)
                     : (keys ? dequantize_impl<2, true> : dequantize_impl<2, false>);
  run(codes.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), zero.data_ptr<at::Half>(), out.data_ptr<float>(), b * h,
      t, d, group);
  return out;
}

torch::Tensor dequantize_keys(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                              int64_t group) {
  return dequantize(codes, scale, zero, bits, group, true);
}

torch::Tensor dequantize_values(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                                int64_t group) {
  return dequantize(codes, scale, zero, bits, group, false);
}

// ---- decode attention --------------------------------------------------------------------------

struct DecodeShape {
  int64_t batch, kv_heads, n_rep, q_len, d, packed_len, residual_len, group, gv, bytes;
  int64_t rows() const { return n_rep * q_len; }  // query rows sharing one KV head
  int64_t total() const { return packed_len + residual_len; }
};

// ---- decode-attention building blocks: AVX2 where the head dim allows, plain loops elsewhere ----

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); exactly 0 below -87 (masked scores are -inf).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lower = _mm256_set1_ps(-87.f);
  const __m256 dead = _mm256_cmp_ps(x, lower, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lower);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// Lane t of the result is the sum of v[t]'s lanes (three rounds of pairwise sums, no per-vector
// horizontal sum).
inline __m256 transpose_sum8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // ab = [v0..v3 lanes 0-3 | v0..v3 lanes 4-7], cd likewise for v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// Lane t = <q, tile row t> for 8 consecutive tile rows of d floats (d a multiple of 8).
inline __m256 scores8(const float* q, const float* tile, int64_t d) {
  __m256 acc[8];
  for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(tile + t * d + c), acc[t]);
  }
  return transpose_sum8(acc);
}
#define ENGRAM_AVX2 1
#endif

// out[i] = <q row i, k> for NR query rows at once: independent accumulators hide the FMA latency.
template <int NR>
inline void dots(const float* q, int64_t d, const float* k, float* out) {
#ifdef ENGRAM_AVX2
  if (d % 8 == 0) {
    __m256 acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
      const __m256 kv = _mm256_loadu_ps(k + c);
      for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * d + c), kv, acc[i]);
    }
    for (int i = 0; i < NR; ++i) out[i] = hsum(acc[i]);
    return;
  }
#endif
  for (int i = 0; i < NR; ++i) out[i] = dot(q + i * d, k, d);
}

// s[r * ld + j] = bias[r] + <q row r, tile row j>, or -inf past the row's causal limit.
void block_scores(const float* q, const float* bias, const float* tile, int64_t n, int64_t rows, int64_t d,
                  const int64_t* limit, int64_t first_pos, float* s, int64_t ld) {
  int64_t j0 = 0;
#ifdef ENGRAM_AVX2
  if (d % 8 == 0) {  // 8 tokens at a time: one horizontal reduction per 8 scores, masking in lanes
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; j0 + 8 <= n; j0 += 8) {
      for (int64_t r = 0; r < rows; ++r) {
        __m256 sc = _mm256_add_ps(scores8(q + r * d, tile + j0 * d, d), _mm256_set1_ps(bias ? bias[r] : 0.f));
        const int last = static_cast<int>(std::clamp<int64_t>(limit[r] - first_pos - j0, -1, 7));  // last lane seen
        if (last < 7) {
          const __m256 past = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(last)));
          sc = _mm256_blendv_ps(sc, _mm256_set1_ps(kNegInf), past);
        }
        _mm256_storeu_ps(s + r * ld + j0, sc);
      }
    }
  }
#endif
  float out[4];
  for (int64_t j = j0; j < n; ++j) {
    const float* k = tile + j * d;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      dots<4>(q + r * d, d, k, out);
      for (int i = 0; i < 4; ++i) s[(r + i) * ld + j] = out[i];
    }
    const int64_t left = rows - r;
    if (left == 3) dots<3>(q + r * d, d, k, out);
    if (left == 2) dots<2>(q + r * d, d, k, out);
    if (left == 1) dots<1>(q + r * d, d, k, out);
    for (int64_t i = 0; i < left; ++i) s[(r + i) * ld + j] = out[i];
    for (r = 0; r < rows; ++r)
      s[r * ld + j] = first_pos + j > limit[r] ? kNegInf : s[r * ld + j] + (bias ? bias[r] : 0.f);
  }
}

// p[j] = exp(s[j] - mx) in place; returns their sum.
inline float exp_shifted(float* s, int64_t n, float mx) {
  float sum = 0.f;
  int64_t j = 0;
#ifdef ENGRAM_AVX2
  __m256 total = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(s + j, p);
    total = _mm256_add_ps(total, p);
  }
  sum = hsum(total);
#endif
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  return sum;
}

#ifdef ENGRAM_AVX2
// Channels [c, c + 8 S) of acc[r] += sum_j p[r * ld + j] * tile[j] for NR rows, held in registers across
// the whole block of tokens: NR x S independent chains of FMAs (one chain per row stalls on the FMA's
// latency at every token).
template <int NR, int S>
void accumulate_slices(const float* p, int64_t ld, const float* tile, int64_t n, int64_t d, int64_t c, float* acc) {
  __m256 a[NR][S];
  for (int i = 0; i < NR; ++i)
    for (int k = 0; k < S; ++k) a[i][k] = _mm256_loadu_ps(acc + i * d + c + 8 * k);
  for (int64_t j = 0; j < n; ++j) {
    const float* v = tile + j * d + c;
    for (int i = 0; i < NR; ++i) {
      const __m256 w = _mm256_broadcast_ss(p + i * ld + j);
      for (int k = 0; k < S; ++k) a[i][k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * k), a[i][k]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int k = 0; k < S; ++k) _mm256_storeu_ps(acc + i * d + c + 8 * k, a[i][k]);
}
#endif

// Channels [c0, c1) of acc[r] += sum_j p[r * ld + j] * tile[j] for NR rows (tile and acc rows: d floats).
template <int NR>
void accumulate_rows(const float* p, int64_t ld, const float* tile, int64_t n, int64_t d, int64_t c0, int64_t c1,
                     float* acc) {
#ifdef ENGRAM_AVX2
  if (d % 8 == 0 && c0 % 8 == 0 && c1 % 8 == 0) {
    constexpr int S = NR >= 3 ? 2 : 4;  // 4-8 chains: more would spill AVX2's 16 registers
    int64_t c = c0;
    for (; c + 8 * S <= c1; c += 8 * S) accumulate_slices<NR, S>(p, ld, tile, n, d, c, acc);
    for (; c < c1; c += 8) accumulate_slices<NR, 1>(p, ld, tile, n, d, c, acc);
    return;
  }
#endif
  for (int i = 0; i < NR; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (p[i * ld + j] != 0.f) axpy(p[i * ld + j], tile + j * d + c0, acc + i * d + c0, c1 - c0);
}

void block_accumulate(const float* p, int64_t ld, const float* tile, int64_t n, int64_t rows, int64_t d, int64_t c0,
                      int64_t c1, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) accumulate_rows<4>(p + r * ld, ld, tile, n, d, c0, c1, acc + r * d);
  if (rows - r == 3) return accumulate_rows<3>(p + r * ld, ld, tile, n, d, c0, c1, acc + r * d);
  for (; r + 2 <= rows; r += 2) accumulate_rows<2>(p + r * ld, ld, tile, n, d, c0, c1, acc + r * d);
  for (; r < rows; ++r) accumulate_rows<1>(p + r * ld, ld, tile, n, d, c0, c1, acc + r * d);
}

// max(init, s[0..n)); a vector max instead of a chain of n dependent scalar ones.
inline float max_of(const float* s, int64_t n, float init) {
  float mx = init;
  int64_t j = 0;
#ifdef ENGRAM_AVX2
  __m256 m = _mm256_set1_ps(init);
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  mx = hmax(m);
#endif
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// The running softmax state of one work item: max, sum and unnormalized output per query row.
struct SoftmaxState {
  std::vector<float> m, l, acc;
  SoftmaxState(int64_t rows, int64_t d) : m(rows, kNegInf), l(rows, 0.f), acc(rows * d, 0.f) {}

  void reset() {
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.f);
    std::fill(acc.begin(), acc.end(), 0.f);
  }

  // Folds scores s (rows x n, leading dim ld) into the state; leaves the probabilities in s.
  void fold(float* s, int64_t rows, int64_t n, int64_t ld, int64_t d) {
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * ld;
      const float mx = max_of(sr, n, m[r]);
      if (mx == kNegInf) {  // every token of this block is masked for this row
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      const float corr = std::exp(m[r] - mx);
      l[r] = l[r] * corr + exp_shifted(sr, n, mx);
      if (corr != 1.f)
        for (int64_t c = 0; c < d; ++c) acc[r * d + c] *= corr;
      m[r] = mx;
    }
  }
};

struct DecodeInputs {
  const float* q;  // (B, Hq, Tq, D), already multiplied by the softmax scale
  const uint8_t *key_codes, *value_codes;
  const at::Half *key_scale, *key_zero, *value_scale, *value_zero;
  const float *residual_keys, *residual_values;
};

// One thread's buffers, allocated once per call and reused by every work item it takes: the query
// rows of the item's KV head and their causal limits, a key group's folded parameters, a tile of
// unpacked codes, a block of scores, and the block's value parameters folded into its probabilities.
struct ItemBuffers {
  std::vector<float> q, qs, qz, tmp, tile, s, scales, zeros, pv, zsum;
  std::vector<int64_t> limit;
  explicit ItemBuffers(const DecodeShape& sh)
      : q(sh.rows() * sh.d), qs(q.size()), qz(sh.rows()), tmp(sh.d), tile(std::max(sh.group, kResidualBlock) * sh.d),
        s(sh.rows() * std::max(sh.group, kResidualBlock)), scales(sh.group * (sh.d / sh.gv)), zeros(scales.size()),
        pv(sh.rows() * scales.size()), zsum(sh.rows() * (sh.d / sh.gv)), limit(sh.rows()) {}
};

// Query rows of one KV head, and the last key position each may see (causal).
void gather_rows(const DecodeInputs& in, const DecodeShape& sh, int64_t b, int64_t kvh, float* q,
                 int64_t* limit) {
  for (int64_t r = 0; r < sh.rows(); ++r) {
    const int64_t head = kvh * sh.n_rep + r / sh.q_len, qi = r % sh.q_len;
    std::copy_n(in.q + ((b * sh.kv_heads * sh.n_rep + head) * sh.q_len + qi) * sh.d, sh.d, q + r * sh.d);
    limit[r] = sh.total() - sh.q_len + qi;
  }
}

// Key group g's per-channel parameters folded into the query rows: qs = q * scale, qz = <q, zero>.
void fold_key_params(const at::Half* ks, const at::Half* kz, const float* q, int64_t rows, int64_t d, float* qs,
                     float* qz, float* tmp) {
  halves_to_floats(kz, tmp, d);
  for (int64_t r = 0; r < rows; ++r) qz[r] = dot(q + r * d, tmp, d);
  halves_to_floats(ks, tmp, d);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d; ++c) qs[r * d + c] = q[r * d + c] * tmp[c];
}

// out[j] = p[j] * sc[j]; returns sum_j p[j] * zr[j].
inline float scale_probabilities(const float* p, const float* sc, const float* zr, int64_t n, float* out) {
  float z = 0.f;
  int64_t j = 0;
#ifdef ENGRAM_AVX2
  __m256 zs = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 pj = _mm256_loadu_ps(p + j);
    _mm256_storeu_ps(out + j, _mm256_mul_ps(pj, _mm256_loadu_ps(sc + j)));
    zs = _mm256_fmadd_ps(pj, _mm256_loadu_ps(zr + j), zs);
  }
  z = hsum(zs);
#endif
  for (; j < n; ++j) {
    out[j] = p[j] * sc[j];
    z += p[j] * zr[j];
  }
  return z;
}

// A block's value parameters folded into its probabilities p (rows x n, leading dim ld): values are
// quantized per token, so per value group sum_j p_j (s_j code_j + z_j) = sum_j (p_j s_j) code_j +
// sum_j p_j z_j, and the codes need no dequantizing. Writes pv[(vg * rows + r) * ld + j] =
// p[r * ld + j] * scale[j][vg] and zsum[r * nvg + vg] = sum_j p[r * ld + j] * zero[j][vg]; `scales`
// and `zeros` (n x nvg floats each) are scratch.
void fold_value_params(const at::Half* vs, const at::Half* vz, const float* p, int64_t n, int64_t rows, int64_t nvg,
                       int64_t ld, float* scales, float* zeros, float* pv, float* zsum) {
  if (nvg == 1) {
    halves_to_floats(vs, scales, n);
    halves_to_floats(vz, zeros, n);
  } else {  // one row of n per value group
    for (int64_t j = 0; j < n; ++j)
      for (int64_t vg = 0; vg < nvg; ++vg) {
        scales[vg * n + j] = half_to_float(vs[j * nvg + vg]);
        zeros[vg * n + j] = half_to_float(vz[j * nvg + vg]);
      }
  }
  for (int64_t vg = 0; vg < nvg; ++vg)
    for (int64_t r = 0; r < rows; ++r)
      zsum[r * nvg + vg] = scale_probabilities(p + r * ld, scales + vg * n, zeros + vg * n, n,
                                               pv + (vg * rows + r) * ld);
}

// Packed key groups [g0, g1) of one (batch, KV head) into `state`.
template <int BITS>
void attend_packed(const DecodeInputs& in, const DecodeShape& sh, int64_t bh, int64_t g0, int64_t g1,
                   ItemBuffers& b, SoftmaxState& state) {
  const int64_t rows = sh.rows(), d = sh.d, n_groups = (sh.packed_len + sh.group - 1) / sh.group;
  const int64_t n_vgroups = d / sh.gv;
  float *qs = b.qs.data(), *qz = b.qz.data(), *tile = b.tile.data(), *s = b.s.data();
  const uint8_t* kc = in.key_codes + bh * sh.packed_len * sh.bytes;
  const uint8_t* vc = in.value_codes + bh * sh.packed_len * sh.bytes;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t t0 = g * sh.group, n = std::min(sh.group, sh.packed_len - t0);
    fold_key_params(in.key_scale + (bh * n_groups + g) * d, in.key_zero + (bh * n_groups + g) * d, b.q.data(),
                    rows, d, qs, qz, b.tmp.data());
    for (int64_t j = 0; j < n; ++j) unpack_row<BITS>(kc + (t0 + j) * sh.bytes, tile + j * d, sh.bytes);
    block_scores(qs, qz, tile, n, rows, d, b.limit.data(), t0, s, sh.group);
    state.fold(s, rows, n, sh.group, d);
    const int64_t vrow = bh * sh.packed_len + t0;
    fold_value_params(in.value_scale + vrow * n_vgroups, in.value_zero + vrow * n_vgroups, s, n, rows, n_vgroups,
                      sh.group, b.scales.data(), b.zeros.data(), b.pv.data(), b.zsum.data());
    for (int64_t j = 0; j < n; ++j) unpack_row<BITS>(vc + (t0 + j) * sh.bytes, tile + j * d, sh.bytes);
    float* acc = state.acc.data();
    for (int64_t vg = 0; vg < n_vgroups; ++vg) {
      block_accumulate(b.pv.data() + vg * rows * sh.group, sh.group, tile, n, rows, d, vg * sh.gv, (vg + 1) * sh.gv,
                       acc);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = vg * sh.gv; c < (vg + 1) * sh.gv; ++c) acc[r * d + c] += b.zsum[r * n_vgroups + vg];
    }
  }
}

void attend_residual(const DecodeInputs& in, const DecodeShape& sh, int64_t bh, ItemBuffers& b,
                     SoftmaxState& state) {
  const int64_t rows = sh.rows(), d = sh.d;
  float* s = b.s.data();
  const float* keys = in.residual_keys + bh * sh.residual_len * d;
  const float* values = in.residual_values + bh * sh.residual_len * d;
  for (int64_t t0 = 0; t0 < sh.residual_len; t0 += kResidualBlock) {
    const int64_t n = std::min(kResidualBlock, sh.residual_len - t0);
    block_scores(b.q.data(), nullptr, keys + t0 * d, n, rows, d, b.limit.data(), sh.packed_len + t0, s,
                 kResidualBlock);
    state.fold(s, rows, n, kResidualBlock, d);
    block_accumulate(s, kResidualBlock, values + t0 * d, n, rows, d, 0, d, state.acc.data());
  }
}

// Many more items than threads, handed out dynamically: on a shared machine a thread that loses its
// core for a time slice would otherwise hold up the whole call with its static share.
int64_t choose_splits(int64_t heads, int64_t n_groups) {
  const int64_t wanted = (16 * at::get_num_threads() + heads - 1) / heads;
  return std::max<int64_t>(1, std::min(wanted, n_groups));
}

template <int BITS>
void decode_impl(const DecodeInputs& in, const DecodeShape& sh, float* out) {
  const int64_t heads = sh.batch * sh.kv_heads, rows = sh.rows(), d = sh.d;
  const int64_t n_groups = (sh.packed_len + sh.group - 1) / sh.group;
  const int64_t splits = n_groups ? choose_splits(heads, n_groups) : 0;
  const int64_t groups_per_split = splits ? (n_groups + splits - 1) / splits : 0;
  const int64_t items_per_head = (splits ? (n_groups + groups_per_split - 1) / groups_per_split : 0) + 1;
  // Partial results per item: m, l (rows each) and acc (rows x d); the last item of each head is
  // the residual window.
  std::vector<float> part_m(heads * items_per_head * rows), part_l(part_m.size()),
      part_acc(part_m.size() * d);
  const int64_t n_items = heads * items_per_head;
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_items)))
  {
    ItemBuffers buffers(sh);
    SoftmaxState state(rows, d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t bh = item / items_per_head, split = item % items_per_head;
      gather_rows(in, sh, bh / sh.kv_heads, bh % sh.kv_heads, buffers.q.data(), buffers.limit.data());
      state.reset();
      if (split == items_per_head - 1) {
        attend_residual(in, sh, bh, buffers, state);
      } else {
        const int64_t g0 = split * groups_per_split, g1 = std::min(g0 + groups_per_split, n_groups);
        attend_packed<BITS>(in, sh, bh, g0, g1, buffers, state);
      }
      std::copy(state.m.begin(), state.m.end(), part_m.begin() + item * rows);
      std::copy(state.l.begin(), state.l.end(), part_l.begin() + item * rows);
      std::copy(state.acc.begin(), state.acc.end(), part_acc.begin() + item * rows * d);
    }
  }
  at::parallel_for(0, heads * rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t hr = begin; hr < end; ++hr) {
      const int64_t bh = hr / rows, r = hr % rows;
      float mx = kNegInf;
      for (int64_t i = 0; i < items_per_head; ++i) mx = std::max(mx, part_m[(bh * items_per_head + i) * rows + r]);
      const int64_t b = bh / sh.kv_heads, head = (bh % sh.kv_heads) * sh.n_rep + r / sh.q_len;
      float* o = out + ((b * sh.kv_heads * sh.n_rep + head) * sh.q_len + r % sh.q_len) * d;
      std::fill(o, o + d, 0.f);
      float total = 0.f;
      for (int64_t i = 0; i < items_per_head; ++i) {
        const int64_t at_ = (bh * items_per_head + i) * rows + r;
        if (part_m[at_] == kNegInf) continue;
        const float w = std::exp(part_m[at_] - mx);
        total += w * part_l[at_];
        axpy(w, part_acc.data() + at_ * d, o, d);
      }
      for (int64_t c = 0; c < d; ++c) o[c] /= total;
    }
  });
}

torch::Tensor decode_attention(torch::Tensor query, torch::Tensor key_codes, torch::Tensor key_scale,
                               torch::Tensor key_zero, torch::Tensor value_codes, torch::Tensor value_scale,
                               torch::Tensor value_zero, torch::Tensor residual_keys, torch::Tensor residual_values,
                               int64_t bits, int64_t group, double scale) {
  check_cpu(query, "query", at::kFloat);
  check_cpu(key_codes, "key_codes", at::kByte);
  check_cpu(value_codes, "value_codes", at::kByte);
  for (auto* t : {&key_scale, &key_zero, &value_scale, &value_zero}) check_cpu(*t, "scales", at::kHalf);
  check_cpu(residual_keys, "residual_keys", at::kFloat);
  check_cpu(residual_values, "residual_values", at::kFloat);
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4");
  DecodeShape sh;
  sh.batch = query.size(0);
  sh.kv_heads = key_codes.size(1);
  sh.n_rep = query.size(1) / sh.kv_heads;
  sh.q_len = query.size(2);
  sh.d = query.size(3);
  sh.packed_len = key_codes.size(2);
  sh.residual_len = residual_keys.size(2);
  sh.group = group;
  sh.gv = std::min(group, sh.d);
  sh.bytes = key_codes.size(3);
  auto q = query * scale;
  auto out = torch::empty_like(query);
  DecodeInputs in{q.data_ptr<float>(),
                  key_codes.data_ptr<uint8_t>(),
                  value_codes.data_ptr<uint8_t>(),
                  key_scale.data_ptr<at::Half>(),
                  key_zero.data_ptr<at::Half>(),
                  value_scale.data_ptr<at::Half>(),
                  value_zero.data_ptr<at::Half>(),
                  residual_keys.data_ptr<float>(),
                  residual_values.data_ptr<float>()};
  (bits == 4 ? decode_impl<4> : decode_impl<2>)(in, sh, out.data_ptr<float>());
  return out;
}

// ---- input signature ---------------------------------------------------------------------------

void append_bytes(std::string& s, int64_t v) { s.append(reinterpret_cast<const char*>(&v), sizeof v); }

// The structure of decode_attention's inputs as bytes: bits, group, then per tensor its dtype,
// device, rank and sizes (one marker byte for None). Python keeps the signatures that passed its
// checks, so the layers of a decode step after the first skip them (this costs ~2 us, the same
// in Python ~5 us). None when an input is not contiguous: that call takes the full path.
py::object decode_signature(const std::vector<std::optional<torch::Tensor>>& tensors, int64_t bits, int64_t group) {
  std::string s;
  s.reserve(16 + tensors.size() * 40);
  append_bytes(s, bits);
  append_bytes(s, group);
  for (const auto& t : tensors) {
    if (!t.has_value() || !t->defined()) {
      s.push_back('\xff');  // ScalarType codes are small: no dtype byte reads as this
      continue;
    }
    if (!t->is_contiguous()) return py::none();
    s.push_back(static_cast<char>(t->scalar_type()));
    s.push_back(static_cast<char>(t->device().type()));
    s.push_back(static_cast<char>(t->device().index()));
    s.push_back(static_cast<char>(t->dim()));
    for (int64_t size : t->sizes()) append_bytes(s, size);
  }
  return py::bytes(s);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engram_kernels KV-cache CPU kernels (KIVI int4/int2, fp32 compute, OpenMP)";
  m.def("quantize_keys", &quantize_keys, "per-channel quantization over groups of tokens -> codes, scale, zero");
  m.def("quantize_values", &quantize_values, "per-token quantization over groups of channels -> codes, scale, zero");
  m.def("dequantize_keys", &dequantize_keys);
  m.def("dequantize_values", &dequantize_values);
  m.def("decode_attention", &decode_attention, "causal GQA attention of a few queries from the packed cache");
  m.def("decode_signature", &decode_signature, "decode_attention's input structure as bytes (None: not contiguous)");
}
