// Decode attention from the packed KV cache on tensor cores (mma.sync m16n8k16, sm_80+), for 16-bit
// queries. Included by kvcache.cu, whose split-K partials and merge kernel (kvcache_merge.cuh) it shares.
//
// Each warp walks 16-token slabs of its block's split and computes S = K Q^T (16 tokens x up to 8
// query rows: one m16n8 C tile per k-step, the queries as B, so no operand holds padding rows) and
// O^T += V^T P^T (D x query rows), P^T's operand made from S's layout by movmatrix. The order of the
// mma's k index is free, so it follows the bytes of the planar layout: for S a lane loads one
// token's P/4 contiguous bytes and each 32-bit word of them is one k-step of A per bit plane; for
// P V a lane loads P/8 contiguous bytes of four tokens and byte q of plane i is output column
// (channel) i*P + lane_row*P/8 + q. A code becomes an operand by prmt: it is placed under a
// constant high byte, so the 16-bit value reads MAGIC + code (bf16 128, fp16 1024); MAGIC times each
// row's operand sum is subtracted once. Key scales fold into the queries once per group, value
// scales into the softmax weights per token (which needs every value group to cover whole bit
// planes); zero points add as row constants.
// A warp issues the next slab's loads (into registers nothing reads until that slab is computed)
// before computing the current one, from pointers it advances instead of recomputing, and asks L2
// for the slab after that (prefetch: no registers); a split's partial last slab is loaded after the
// loop, so the loop's loads need no predicates. The query rows sit in shared memory (as floats
// times the softmax scale), and a key group's scale and zero rows are copied there (cp.async) when
// the group before it starts, so that a group's setup does not wait on global memory; the setup
// runs between the scores of the slab before it and that slab's softmax and P V, so that its
// latency overlaps them.
#pragma once

#ifdef ENGRAM_HOST_WARPS  // compiled for a CPU by the emulator the tests run (csrc/emulation)
#include "../emulation/host_warps.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ptx.cuh"
#endif

#include <cstring>
#include <type_traits>

#include "kvcache_merge.cuh"

namespace engram {

// What both decode kernels take: the packed cache, its lengths and the split-K partials they write.
struct DecodeArgs {
  const uint8_t *key_codes, *value_codes;
  const __half *key_scale, *key_zero, *value_scale, *value_zero;
  float *part_m, *part_l, *part_acc;  // (heads, parts, rows[, d]): per warp (CUDA cores) or per block (mma)
  int64_t packed_len, residual_len, n_groups, tokens_per_split;
  int n_splits, rows, q_len, group, gv, d;
  float scale;
};

namespace mma_decode {

// The 16-bit operand type T (at::BFloat16 or at::Half): its magic high byte and conversions.
template <typename T>
struct Operand {
  static constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  // bf16 0x43XX = 128 + XX, fp16 0x64XX = 1024 + XX for small XX
  static constexpr uint32_t kHighBytes = kBf16 ? 0x43434343u : 0x64646464u;
  static constexpr float kMagic = kBf16 ? 128.f : 1024.f;

  __device__ static uint32_t pack(float lo, float hi) {
    uint32_t bits;
    if constexpr (kBf16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      memcpy(&bits, &v, sizeof(bits));
    } else {
      const __half2 v = __floats2half2_rn(lo, hi);
      memcpy(&bits, &v, sizeof(bits));
    }
    return bits;
  }
  __device__ static float rounded(float x) {
    if constexpr (kBf16) return __bfloat162float(__float2bfloat16_rn(x));
    else return __half2float(__float2half_rn(x));
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16<kBf16>(d, a, b0, b1);
  }
};

// e^x as one ex2.approx.ftz (what __expf adds around it handles denormal results, which only
// underflow to 0 here anyway).
__device__ __forceinline__ float fast_exp(float x) { return ptx::ex2(x * 1.4426950408889634f); }

using ptx::prmt;

template <int BITS>
__device__ __forceinline__ uint32_t plane(uint32_t word, int i) {
  constexpr uint32_t kMask = ((1u << BITS) - 1) * 0x01010101u;
  return (word >> (i * BITS)) & kMask;
}

// Loads n bytes (4, 8 or 16; aligned) as 32-bit words, or zeros.
template <int WORDS>
__device__ __forceinline__ void load_words(uint32_t (&w)[WORDS], const uint8_t* p, bool valid) {
  if constexpr (WORDS == 4) {
    const uint4 v = valid ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (WORDS == 2) {
    const uint2 v = valid ? __ldg(reinterpret_cast<const uint2*>(p)) : make_uint2(0, 0);
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = valid ? __ldg(reinterpret_cast<const uint32_t*>(p)) : 0u;
  }
}

// The shared decode arguments (kvcache.cu's kernels take the same).
struct Args : DecodeArgs {
  bool l2_prefetch;  // ENGRAM_KV_L2_PREFETCH=0 turns the prefetch instructions off (to time them)
  int* done;         // per head: splits finished, 0 before and after; null: the merge kernel merges
};

constexpr int kWarps = 4;
constexpr int kMaxRows = 8;  // query rows per KV head: the n of an m16n8k16 tile

// Parts of the work a timing-only build leaves out (csrc/cuda/kvcache_ablation.cu; its results are
// wrong by design): what the kernel's time drops by without each part says where the time goes.
enum Ablation : int {
  kKeepAll = 0,
  kOneKeyGroup = 1,  // set up the first key group only
  kNoKeys = 2,       // no key codes and no S mma (scores 0)
  kNoSoftmax = 4,    // the scores are the weights
  kNoValues = 8,     // no value codes, value scales or P V mma
  kNoLoads = 16,     // the first slab's codes and scales for every slab (no loads in the loop)
};

// Dynamic shared memory: the block's query rows times the softmax scale as floats (kMaxRows x D, rows
// past the real ones 0), then per warp two key groups' fp16 scale and zero rows (2 buffers x 2 x D).
constexpr size_t shared_bytes(int64_t d) { return static_cast<size_t>(kMaxRows * 4 + kWarps * 4 * 2) * d; }

// One warp's state. Lane (g, t) = (lane / 4, lane % 4): in S = K Q^T (16 tokens x 8 query rows) and
// in O^T (channels x query rows) it holds query rows 2t and 2t + 1; S's tokens g and g + 8. VG value
// groups per token (a compile-time constant, so that the value scales' addresses are constant
// offsets), each covering whole planes.
template <typename T, int BITS, int D, int VG>
struct Warp {
  static constexpr int P = D * BITS / 8;   // bytes per token
  static constexpr int PER = 8 / BITS;     // bit planes
  static constexpr int GROUP_PLANES = PER / VG;  // bit planes per value group
  static_assert(VG >= 1 && PER % VG == 0, "value groups must cover whole bit planes");
  static constexpr int KSTEPS = D / 16;    // k-steps of S: (plane, word of the lane's P/4 bytes)
  static constexpr int KWORDS = P / 16;    // words per lane per token for S
  static constexpr int VBYTES = P / 8;     // bytes per lane per token for O^T = V^T P^T
  static constexpr int VWORDS = VBYTES / 4;
  static constexpr int MTILES = D / 16;    // O^T row tiles: (plane, byte pair of the lane's VBYTES)
  static constexpr int SW = VG >= 2 ? VG / 2 : 1;  // 32-bit words of one token's value scales
  using Op = Operand<T>;

  int g, t;
  const float* qrow;       // query row g times the softmax scale in shared memory (0 for a padding row)
  uint32_t qb[KSTEPS][2];  // B fragments of S: Q^T, query row g (the query rows need no padding)
  float bias[2];           // rows 2t, 2t + 1: q . zero - MAGIC * sum of the B operands (current key group)
  float o[MTILES][4];      // C fragments of O^T: channels (rows) g, g + 8 x query rows 2t, 2t + 1
  float m[2], l[2];        // rows 2t, 2t + 1: running max; this lane's share (tokens g, g + 8) of the sum
  float zsum[VG][2];       // the same rows' shares, per value group: sum of p * value zero - MAGIC * sum of
                           // P's operands

  // Channel of k position (t, e) of k-step kk: e 0, 1 -> k 2t, 2t + 1; e 2, 3 -> 2t + 8, 2t + 9.
  __device__ __forceinline__ static int key_channel(int kk, int t, int e) {
    return (kk / KWORDS) * P + t * (P / 4) + (kk % KWORDS) * 4 + e;
  }
  // Channel of row r (0..15) of O^T tile mm: plane mm / (VBYTES / 2), byte pair mm % (VBYTES / 2).
  __device__ __forceinline__ static int out_channel(int mm, int r) {
    return (mm / (VBYTES / 2)) * P + (r % 8) * VBYTES + 2 * (mm % (VBYTES / 2)) + r / 8;
  }

  __device__ __forceinline__ void init(const float* query_rows, int lane) {
    g = lane / 4, t = lane % 4;
    qrow = query_rows + g * D;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      m[e] = -INFINITY, l[e] = 0.f;
#pragma unroll
      for (int j = 0; j < VG; ++j) zsum[j][e] = 0.f;
    }
#pragma unroll
    for (int mm = 0; mm < MTILES; ++mm)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mm][e] = 0.f;
  }

  // Copies a key group's scale and zero rows (D halves each, global) to `rows` (2 x D, shared): one
  // 16-byte cp.async per lane, committed as one group.
  __device__ __forceinline__ void stage_group(__half* rows, const __half* scale, const __half* zero) const {
    constexpr int kChunks = D * 2 / 16;  // 16-byte pieces of one row
    const int lane = 4 * g + t;
    if (lane < 2 * kChunks) {
      const __half* from = (lane < kChunks ? scale : zero) + 8 * (lane % kChunks);
      ptx::cp_async_16(rows + 8 * lane, from, 16);
    }
    ptx::cp_async_commit();
  }

  // B fragments for one key group (scale, zero: the group's (D,) rows in shared memory), or with CODES
  // false for the residual window (no scales; a compile-time flag, so the packed loop has no null test
  // to branch on).
  template <bool CODES>
  __device__ __forceinline__ void set_group(const __half* scale, const __half* zero) {
    constexpr uint32_t kMagicPair = Op::kHighBytes & 0xff00ff00u;  // two 16-bit MAGICs
    const uint32_t magic_a[4] = {kMagicPair, kMagicPair, kMagicPair, kMagicPair};
    float part = 0.f, magic[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      float s[4] = {1.f, 1.f, 1.f, 1.f}, z[4] = {0.f, 0.f, 0.f, 0.f};
      if constexpr (CODES) {
        const int c = key_channel(kk, t, 0);  // the lane's four channels are contiguous
        const uint2 sv = *reinterpret_cast<const uint2*>(scale + c);
        const uint2 zv = *reinterpret_cast<const uint2*>(zero + c);
        const __half* sh = reinterpret_cast<const __half*>(&sv);
        const __half* zh = reinterpret_cast<const __half*>(&zv);
#pragma unroll
        for (int e = 0; e < 4; ++e) s[e] = __half2float(sh[e]), z[e] = __half2float(zh[e]);
      }
      float q[4], qs[4];
      {  // the lane's four channels: 16 aligned bytes
        const float4 qv = *reinterpret_cast<const float4*>(qrow + key_channel(kk, t, 0));
        q[0] = qv.x, q[1] = qv.y, q[2] = qv.z, q[3] = qv.w;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        qs[e] = q[e] * s[e];
        part += q[e] * z[e];
      }
      qb[kk][0] = Op::pack(qs[0], qs[1]);
      qb[kk][1] = Op::pack(qs[2], qs[3]);
      // MAGIC times each row's sum of B operands, as S will see it: the same mma against A = MAGIC
      if constexpr (CODES) Op::mma(magic, magic_a, qb[kk][0], qb[kk][1]);
    }
    if constexpr (CODES) {
      part += __shfl_xor_sync(kFullMask, part, 1);
      part += __shfl_xor_sync(kFullMask, part, 2);  // row g's, in quad g
#pragma unroll
      for (int e = 0; e < 2; ++e) bias[e] = __shfl_sync(kFullMask, part, 4 * (2 * t + e)) - magic[e];
    } else {
      bias[0] = bias[1] = 0.f;  // the residual window has no codes: no zero points or MAGIC
    }
  }

  // s += K Q^T for k-step kk, K's fragments from the key operand words of tokens g (k0, k1: its k
  // positions 2t, 2t + 1 and 2t + 8, 2t + 9) and g + 8 (k8_0, k8_1).
  __device__ __forceinline__ void mma_s(float (&s)[4], int kk, uint32_t k0, uint32_t k1, uint32_t k8_0,
                                        uint32_t k8_1) const {
    const uint32_t a[4] = {k0, k8_0, k1, k8_1};
    Op::mma(s, a, qb[kk][0], qb[kk][1]);
  }

  // Online softmax over a slab's scores s[h * 2 + e] (token g + 8h, row 2t + e, with the key group's
  // bias); leaves p there. Row 2t + e sees the slab's first visible[e] tokens (those that exist and are
  // not after its query).
  __device__ __forceinline__ void softmax(float (&s)[4], const int (&visible)[2]) {
    float alpha[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (visible[e] < 16) {
#pragma unroll
        for (int h = 0; h < 2; ++h) s[2 * h + e] = g + 8 * h < visible[e] ? s[2 * h + e] : -INFINITY;
      }
      float mx = fmaxf(s[e], s[2 + e]);
#pragma unroll
      for (int lanes = 4; lanes < kWarp; lanes *= 2) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, lanes));
      const float m_new = fmaxf(m[e], mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet
      alpha[e] = fast_exp(m[e] - m_safe);
      m[e] = m_new;
      s[e] = fast_exp(s[e] - m_safe);
      s[2 + e] = fast_exp(s[2 + e] - m_safe);
      l[e] = l[e] * alpha[e] + s[e] + s[2 + e];
#pragma unroll
      for (int j = 0; j < VG; ++j) zsum[j][e] *= alpha[e];
    }
    // O^T's columns are the same rows 2t, 2t + 1. Once the running maxima settle no row's factor
    // differs from 1 and the warp skips the rescale.
    if (__any_sync(kFullMask, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int mm = 0; mm < MTILES; ++mm)
        o[mm][0] *= alpha[0], o[mm][1] *= alpha[1], o[mm][2] *= alpha[0], o[mm][3] *= alpha[1];
    }
  }

  // B fragments of P^T (tokens 2t, 2t + 1 | 2t + 8, 2t + 9 x row g) from the softmax weights p (in S's
  // layout) times per-token factors f (tokens g, g + 8): each 8 x 8 half packed and transposed by
  // movmatrix. With `codes`, adds each row's sum(p * add) - MAGIC * sum(P^T operands) to zs.
  __device__ __forceinline__ void p_fragment(uint32_t (&pb)[2], const float (&p)[4], const float (&f)[2],
                                             const float (&add)[2], float (&zs)[2], bool codes) const {
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = p[k] * f[k / 2];
#pragma unroll
    for (int h = 0; h < 2; ++h) pb[h] = ptx::movmatrix_trans(Op::pack(v[2 * h], v[2 * h + 1]));
    if (codes) {
#pragma unroll
      for (int k = 0; k < 4; ++k) zs[k % 2] += p[k] * add[k / 2] - Op::kMagic * Op::rounded(v[k]);
    }
  }

  // What one 16-token slab of the packed store reads, loaded a slab ahead of its use so that the
  // loads of the next slab are in flight while this one is computed.
  struct Loads {
    uint32_t k[2][KWORDS];  // key codes of tokens g, g + 8: the lane's P/4 bytes
    uint32_t v[4][VWORDS];  // value codes of tokens 2t, 2t + 1, 2t + 8, 2t + 9: the lane's VBYTES bytes
    // fp16 bits of tokens g and g + 8's value scale and zero per value group (P's factors in S's
    // layout), two groups to a word (0 for absent tokens), untouched until the slab is computed so
    // that the loads stay in flight. Whole words, one load per token: ptxas packed 16-bit ones in
    // pairs right after their loads (to free registers), so every slab waited for the next one's.
    uint32_t scale[2][SW], zero[2][SW];
  };

  // For the no-loads ablation: hides from the compiler that the slab's loads stay the same, so that it
  // unpacks them every slab as the real loop does (not once, out of the loop, in registers it lacks).
  __device__ __forceinline__ static void opaque(Loads& x) {
    uint32_t* words = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(Loads) / 4); ++i) asm volatile("" : "+r"(words[i]));
  }

  // One token's VG value scales (or zeros) as SW words, or zeros.
  __device__ __forceinline__ static void load_halves(uint32_t (&w)[SW], const __half* p, bool valid) {
    if constexpr (VG == 1) w[0] = valid ? __ldg(reinterpret_cast<const unsigned short*>(p)) : 0u;
    else load_words(w, reinterpret_cast<const uint8_t*>(p), valid);
  }
  // Value group j's fp16 of a token's words, as a float.
  __device__ __forceinline__ static float half_of(const uint32_t (&w)[SW], int j) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w[j / 2] >> (16 * (j % 2)))));
  }

  __device__ __forceinline__ static int slot_token(int t, int k) { return 2 * t + (k & 1) + 8 * (k >> 1); }

  // Where the lane reads a slab: key codes and value scales of token g, value codes of token 2t (the
  // other tokens at constant offsets); moved 16 tokens per slab, so the loop does no 64-bit index
  // arithmetic.
  struct Cursor {
    const uint8_t *key, *value;
    const __half *value_scale, *value_zero;
  };

  __device__ __forceinline__ Cursor cursor(int64_t head, int64_t tok0, const Args& a) const {
    const int64_t row0 = head * a.packed_len + tok0;
    return {a.key_codes + (row0 + g) * P + t * (P / 4), a.value_codes + (row0 + 2 * t) * P + g * VBYTES,
            a.value_scale + (row0 + g) * VG, a.value_zero + (row0 + g) * VG};
  }

  // Moves the cursor `slabs` (0 or 1) slabs on.
  __device__ __forceinline__ static void advance(Cursor& c, int slabs = 1) {
    c.key += slabs * 16 * P, c.value += slabs * 16 * P;
    c.value_scale += slabs * 16 * VG, c.value_zero += slabs * 16 * VG;
  }

  // The line a lane asks L2 for in a slab two ahead of the one being computed (no registers, no wait,
  // so that the loads issued a slab later need not go to DRAM): one 128-byte line of the key or value
  // codes per lane (lanes past those lines repeat them), the lane's pointer moved one slab per slab.
  static constexpr int kPrefetchLines = 16 * P / 128;  // lines of one slab's key (or value) codes

  // The lane's line in the slab after the one at `c` (the cursor's first slab).
  __device__ __forceinline__ const uint8_t* prefetch_line(const Cursor& c) const {
    const int line = (4 * g + t) % (2 * kPrefetchLines);
    const uint8_t* codes = line < kPrefetchLines ? c.key - g * P - t * (P / 4) : c.value - 2 * t * P - g * VBYTES;
    return codes + 16 * P + 128 * (line % kPrefetchLines);
  }

  // Moves `line` one slab on and asks for it there when `ask` (only for whole slabs: every lane's line
  // exists there).
  __device__ __forceinline__ static void prefetch_next(const uint8_t*& line, bool ask) {
    line += 16 * P;
    if (ask) ptx::prefetch_l2(line);
  }

  // Issues the loads of the slab at `c`, all into registers nothing reads before the slab is computed:
  // a whole slab's (WHOLE: every one but a split's last), or the first `valid` tokens' (absent ones 0).
  template <bool WHOLE>
  __device__ __forceinline__ void load(Loads& x, const Cursor& c, int valid = 16) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool exists = WHOLE || 8 * h + g < valid;
      load_words(x.k[h], c.key + 8 * h * P, exists);
      load_halves(x.scale[h], c.value_scale + 8 * h * VG, exists);
      load_halves(x.zero[h], c.value_zero + 8 * h * VG, exists);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      load_words(x.v[k], c.value + ((k & 1) + 8 * (k >> 1)) * P, WHOLE || slot_token(t, k) < valid);
  }

  // The scores S of one 16-token slab of the packed store, from its loads: they start from the key
  // group's bias, so that the next group's setup may follow at once.
  template <int ABLATE = kKeepAll>
  __device__ __forceinline__ void scores(const Loads& x, float (&s)[4]) const {
    s[0] = s[2] = bias[0], s[1] = s[3] = bias[1];
#pragma unroll
    for (int kk = 0; kk < KSTEPS && !(ABLATE & kNoKeys); ++kk) {
      const uint32_t w = plane<BITS>(x.k[0][kk % KWORDS], kk / KWORDS);  // token g
      const uint32_t w8 = plane<BITS>(x.k[1][kk % KWORDS], kk / KWORDS);  // token g + 8
      mma_s(s, kk, prmt(w, Op::kHighBytes, 0x5140), prmt(w, Op::kHighBytes, 0x7362),
            prmt(w8, Op::kHighBytes, 0x5140), prmt(w8, Op::kHighBytes, 0x7362));
    }
  }

  // The rest of a slab: softmax of its scores s (row 2t + e sees visible[e] tokens), then O^T += V^T P^T.
  template <int ABLATE = kKeepAll>
  __device__ __forceinline__ void finish_slab(const Loads& x, float (&s)[4], const int (&visible)[2]) {
    if constexpr (!(ABLATE & kNoSoftmax)) softmax(s, visible);
    if constexpr (ABLATE & kNoValues) o[0][0] += s[0] + s[1];  // the scores stay live
    else values_slab(x, s);
  }

  // O^T += V^T P^T for one slab, from its value codes and scales and the softmax weights s (S's layout).
  __device__ __forceinline__ void values_slab(const Loads& x, const float (&s)[4]) {
    uint32_t pb[VG][2];  // P^T times the value scales of each value group
#pragma unroll
    for (int j = 0; j < VG; ++j) {
      float f[2], add[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        f[h] = half_of(x.scale[h], j);
        add[h] = half_of(x.zero[h], j);
      }
      p_fragment(pb[j], s, f, add, zsum[j], true);
    }
    // Bytes j, j + 1 of a token pair's words side by side ([2t: j, 2t+1: j, 2t: j+1, 2t+1: j+1]), once
    // for all planes: a plane of it then becomes two operand words by one prmt each (as on the key side).
    uint32_t pairs[2][VBYTES / 2];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int bp = 0; bp < VBYTES / 2; ++bp) {
        const uint32_t j = 2 * bp % 4;
        const uint32_t selector = j | (j + 4) << 4 | (j + 1) << 8 | (j + 5) << 12;
        pairs[h][bp] = prmt(x.v[2 * h][bp / 2], x.v[2 * h + 1][bp / 2], selector);
      }
#pragma unroll
    for (int mm = 0; mm < MTILES; ++mm) {
      const int i = mm / (VBYTES / 2), bp = mm % (VBYTES / 2), group = i / GROUP_PLANES;
      uint32_t frag[4];  // rows g, g + 8 = bytes 2 bp, 2 bp + 1; tokens 2t, 2t + 1 | 2t + 8, 2t + 9
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t w = plane<BITS>(pairs[h][bp], i);
        frag[2 * h] = prmt(w, Op::kHighBytes, 0x5140);
        frag[2 * h + 1] = prmt(w, Op::kHighBytes, 0x7362);
      }
      Op::mma(o[mm], frag, pb[group][0], pb[group][1]);
    }
  }

  // How many tokens of the residual window row 2t + e sees (its query is token (2t + e) % q_len of the
  // newest q_len; fewer than none when the queries reach back into the packed store).
  __device__ __forceinline__ int residual_seen(const Args& a, int e) const {
    return static_cast<int>(a.residual_len - a.q_len) + (2 * t + e) % a.q_len + 1;
  }

  // One 16-token slab of the full-precision residual window (tokens tok0 .., `valid` exist).
  __device__ __forceinline__ void residual_slab(const T* rk, const T* rv, int64_t head, int tok0, int valid,
                                                const Args& a) {
    const T* keys = rk + (head * a.residual_len + tok0) * D;
    const T* values = rv + (head * a.residual_len + tok0) * D;
    float s[4] = {};
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      uint32_t k[2][2];  // tokens g, g + 8 x k positions 2t, 2t + 1 | 2t + 8, 2t + 9
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          const T* at = keys + (g + 8 * h) * D + key_channel(kk, t, 2 * w);
          k[h][w] = g + 8 * h < valid ? __ldg(reinterpret_cast<const uint32_t*>(at)) : 0u;
        }
      mma_s(s, kk, k[0][0], k[0][1], k[1][0], k[1][1]);
    }
    int visible[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) visible[e] = min(valid, max(residual_seen(a, e) - tok0, 0));
    softmax(s, visible);
    const float ones[2] = {1.f, 1.f};
    float unused[2];
    uint32_t pb[2];
    p_fragment(pb, s, ones, ones, unused, false);
#pragma unroll
    for (int mm = 0; mm < MTILES; ++mm) {
      uint32_t frag[4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int c = out_channel(mm, g + 8 * r);
          uint32_t pair[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int tok = slot_token(t, 2 * h + u);
            pair[u] = tok < valid ? __ldg(reinterpret_cast<const unsigned short*>(values + tok * D + c)) : 0u;
          }
          frag[2 * h + r] = pair[0] | (pair[1] << 16);
        }
      Op::mma(o[mm], frag, pb[0], pb[1]);
    }
  }

  // This warp's (max, sum, output) of the real rows into m_out[row], l_out[row], acc_out[row * D + c].
  __device__ __forceinline__ void store(float* m_out, float* l_out, float* acc_out, const Args& a) {
#pragma unroll
    for (int lanes = 4; lanes < kWarp; lanes *= 2)  // the sums over tokens g, g + 8 of every g
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        l[e] += __shfl_xor_sync(kFullMask, l[e], lanes);
#pragma unroll
        for (int j = 0; j < VG; ++j) zsum[j][e] += __shfl_xor_sync(kFullMask, zsum[j][e], lanes);
      }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int row = 2 * t + e;
      if (row >= a.rows) continue;
      if (g == 0) m_out[row] = m[e], l_out[row] = l[e];
#pragma unroll
      for (int mm = 0; mm < MTILES; ++mm) {
        const float zi = zsum[mm / (VBYTES / 2) / GROUP_PLANES][e];  // the value group of the tile's plane
#pragma unroll
        for (int r = 0; r < 2; ++r) acc_out[row * D + out_channel(mm, g + 8 * r)] = o[mm][2 * r + e] + zi;
      }
    }
  }
};

// Three blocks per SM (168 registers, no spills): 4 would need 128 registers and spill the loop's
// prefetched slab.
constexpr int kMinBlocks = 3;

// The head's output from its splits' partials, by the block that finished last (ENGRAM_KV_MERGE=fused):
// a thread folds 4 channels of a row over all the splits, 16 splits' loads at a time (at 32k-128k
// on an H100, 48 splits: 3 rounds of L2 latency; the registers are free by now).
template <typename T, int D>
__device__ void merge_splits(const Args& a, int64_t head, T* __restrict__ out) {
  for (int i = threadIdx.x; i < a.rows * D / 4; i += kWarps * kWarp) {
    const int r = 4 * i / D;
    const int64_t row0 = head * a.n_splits * a.rows + r;  // split 0's (part, row)
    SoftmaxState<4> s;
    add_parts<16>(s, a.part_m + row0, a.part_l + row0, a.part_acc + row0 * D + 4 * (i % (D / 4)), a.rows,
                  int64_t{a.rows} * D, 0, 1, a.n_splits);
#pragma unroll
    for (int e = 0; e < 4; ++e) out[head * a.rows * D + 4 * i + e] = static_cast<T>(s.acc[e] / s.l);
  }
  if (threadIdx.x == 0) a.done[head] = 0;  // ready for the next call
}

template <typename T, int BITS, int D, int VG, int ABLATE = kKeepAll>
__global__ void __launch_bounds__(kWarps * kWarp, kMinBlocks) decode_kernel(const T* __restrict__ query,
                                                                const T* __restrict__ residual_keys,
                                                                const T* __restrict__ residual_values,
                                                                T* __restrict__ out, Args a) {
  ptx::launch_dependents();  // the merge kernel's launch overlaps this grid (it waits for the partials)
  const int64_t head = blockIdx.x;
  const int split = blockIdx.y, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  ENGRAM_DYNAMIC_SHARED(shared);
  float* query_rows = reinterpret_cast<float*>(shared);
  // this warp's 2 x (scale, zero) rows
  __half* key_rows = reinterpret_cast<__half*>(query_rows + kMaxRows * D) + warp * 4 * D;
#pragma unroll  // all of a thread's loads in flight at once
  for (int k = 0; k < kMaxRows * D / (kWarps * kWarp); ++k) {  // read by every key group's setup
    const int i = threadIdx.x + k * kWarps * kWarp;
    query_rows[i] = i < a.rows * D ? static_cast<float>(query[head * a.rows * D + i]) * a.scale : 0.f;
  }
  Warp<T, BITS, D, VG> w;
  w.init(query_rows, lane);

  // The split's packed tokens, a contiguous run of whole slabs per warp (key groups change rarely); the
  // loop counts tokens from the split's first one, in 32 bits.
  const int64_t t0 = split * a.tokens_per_split, t1 = min(t0 + a.tokens_per_split, a.packed_len);
  const int len = t1 > t0 ? static_cast<int>(t1 - t0) : 0;
  const int slabs = (len + 15) / 16, per_warp = (slabs + kWarps - 1) / kWarps;
  const int first = warp * per_warp, end = min(slabs, first + per_warp);
  const auto valid = [&](int sl) { return min(16, len - 16 * sl); };
  const auto visible = [&](int sl, int e) {  // row 2t + e's tokens of slab sl: all, unless its query reaches back
    if (a.residual_len >= a.q_len) return valid(sl);
    return static_cast<int>(
        min(int64_t{valid(sl)}, max(a.packed_len + w.residual_seen(a, e) - t0 - 16 * sl, int64_t{0})));
  };
  typename Warp<T, BITS, D, VG>::Loads cur, next;
  auto at = w.cursor(head, t0 + 16 * first, a);
  auto prefetch = w.prefetch_line(at);
  const auto buffer = [&](int64_t group) { return key_rows + (group & 1) * 2 * D; };
  const auto stage = [&](int64_t group) {
    const int64_t rows = (head * a.n_groups + group) * D;
    w.stage_group(buffer(group), a.key_scale + rows, a.key_zero + rows);
  };
  // Key groups are whole slabs and a split starts on a slab: the loop meets its groups one after another.
  int64_t group = first < end ? (t0 + 16 * first) / a.group : 0;
  int group_end = static_cast<int>((group + 1) * a.group - t0);  // the next group's first token
  // The loop's slabs are whole; a split's partial last slab follows it.
  const int whole_end = max(first, min(end, len / 16));
  if (first < whole_end) w.template load<true>(cur, at);
  if (first < end) stage(group);
  else ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();  // the query rows
  const auto start_group = [&] {  // the setup of key group `group`
    ptx::cp_async_wait<0>();  // its rows, staged when the previous one started
    __syncwarp();             // ... by every lane; and every lane is done with the previous group's buffer
    if (group + 1 < a.n_groups) stage(group + 1);
    w.template set_group<true>(buffer(group), buffer(group) + D);
  };
  const auto compute = [&](int sl) {  // slab `sl`, from `cur`
    float s[4];
    w.template scores<ABLATE>(cur, s);
    // The next slab's key group is set up between this slab's scores and the rest of its work, which
    // does not depend on it: the setup's latency overlaps this slab's softmax and P V.
    if (sl + 1 < end && 16 * (sl + 1) >= group_end && !(ABLATE & kOneKeyGroup)) {
      ++group, group_end += a.group;
      start_group();
    }
    const int seen[2] = {visible(sl, 0), visible(sl, 1)};
    w.template finish_slab<ABLATE>(cur, s, seen);
  };
  if (first < end) start_group();
  // cur and next alternate registers instead of being copied (copies wait for the loads): the loop is
  // unrolled by 2 and no branch goes around the loads, which after the last whole slab read it again.
#pragma unroll 2
  for (int sl = first; sl < whole_end; ++sl) {
    if constexpr (!(ABLATE & kNoLoads)) {
      w.advance(at, sl + 1 < whole_end);
      w.template load<true>(next, at);
      w.prefetch_next(prefetch, a.l2_prefetch && sl + 2 < whole_end);
    }
    compute(sl);
    if constexpr (ABLATE & kNoLoads) w.opaque(cur);
    else cur = next;
  }
  if (whole_end < end) {  // the partial slab, loaded after the loop so that the loop's loads need no predicates
    if (whole_end > first) w.advance(at);
    w.template load<false>(cur, at, valid(whole_end));
    compute(whole_end);
  }
  ptx::cp_async_wait<0>();  // a group staged past the warp's last slab
  if (split == a.n_splits - 1 && a.residual_len > 0) {
    w.template set_group<false>(nullptr, nullptr);
    for (int tok0 = 16 * warp; tok0 < a.residual_len; tok0 += 16 * kWarps)
      w.residual_slab(residual_keys, residual_values, head, tok0, min(16, static_cast<int>(a.residual_len) - tok0), a);
  }
  // The block's warps combine their states in shared memory: one split-K partial per block.
  __shared__ float m_s[kWarps][8], l_s[kWarps][8], acc_s[kWarps][8 * D];
  w.store(m_s[warp], l_s[warp], acc_s[warp], a);
  __syncthreads();
  const int64_t part = head * a.n_splits + split;
  for (int i = threadIdx.x; i < a.rows * D; i += kWarps * kWarp) {
    const int row = i / D;
    SoftmaxState<1> s;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) {
      const float acc[1] = {acc_s[v][i]};
      s.add(m_s[v][row], l_s[v][row], acc);
    }
    a.part_acc[part * a.rows * D + i] = s.acc[0];
    if (i % D == 0) a.part_m[part * a.rows + row] = s.m, a.part_l[part * a.rows + row] = s.l;
  }
  if (a.done == nullptr) return;  // kvcache.cu's merge kernel adds the partials up
  // The head's last block to finish merges its splits (no second kernel launch per decode step).
  __shared__ bool merges;
  __threadfence();  // this block's partials are visible to every block before it counts itself done
  __syncthreads();
  if (threadIdx.x == 0) merges = atomicAdd(a.done + head, 1) == a.n_splits - 1;
  __syncthreads();
  if (merges) merge_splits<T, D>(a, head, out);
}

// The kernel's arguments from the shared ones (host side).
inline Args make_args(const DecodeArgs& a, bool l2_prefetch, int* done) {
  Args m{a};
  m.l2_prefetch = l2_prefetch;
  m.done = done;
  return m;
}

// The shapes the kernel takes: head dim 64 or 128 with at least 4 bytes per lane for V^T P^T, key
// groups of whole slabs, value groups covering whole planes, up to 8 query rows per KV head (the n
// of an m16n8k16 tile).
inline bool supported_shape(int64_t d, int64_t bits, int64_t group, int64_t rows) {
  const int64_t p = d * bits / 8, gv = std::min(group, d);
  return (d == 64 || d == 128) && p / 8 >= 4 && group % 16 == 0 && gv % p == 0 && rows <= kMaxRows;
}

// The kernel for these bits, head dim and value groups per token (d / gv), of the shapes
// supported_shape() admits.
template <typename T, int BITS, int D>
auto kernel_for_groups(int64_t value_groups) {
  if constexpr (BITS == 2) {
    if (value_groups == 4) return decode_kernel<T, BITS, D, 4>;
  }
  return value_groups == 2 ? decode_kernel<T, BITS, D, 2> : decode_kernel<T, BITS, D, 1>;
}

template <typename T>
auto kernel_for(int64_t bits, int64_t d, int64_t value_groups) {
  if (bits == 4 && d == 128) return kernel_for_groups<T, 4, 128>(value_groups);
  if (bits == 4 && d == 64) return kernel_for_groups<T, 4, 64>(value_groups);
  return kernel_for_groups<T, 2, 128>(value_groups);  // int2 needs d 128 (supported: 4 bytes per lane)
}

#ifndef ENGRAM_HOST_WARPS
inline int compute_major() {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c10::cuda::current_device()));
  return major;
}

// Whether the tensor-core kernel takes these: 16-bit queries of a supported shape, on sm_80 or newer.
inline bool supported(at::ScalarType dtype, int64_t d, int64_t bits, int64_t group, int64_t rows) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && supported_shape(d, bits, group, rows) &&
         compute_major() >= 8;
}
#endif

}  // namespace mma_decode
}  // namespace engram
