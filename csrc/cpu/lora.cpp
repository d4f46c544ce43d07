// CPU backend of the LoRA ops (see engram_kernels/ops/lora/naive.py for the math).
//
// The frozen x Wᵀ and the rank-r products are GEMMs, which ATen's BLAS does best; what this file
// adds over a composition of torch ops is fewer passes, temporaries and parallel regions: the
// LoRA branch is accumulated into y / dx in place (no (N, out) temporaries as in peft), all its thin
// GEMMs run in one parallel region over row blocks, dropout is a counter-based hash regenerated
// in the backward (no mask or dropped input is kept), and the many-adapter op runs each adapter's
// rows as one segment (a GEMM pair), segments spread over threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>


namespace {

using at::Tensor;

constexpr int kKeepBits = 24;

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// The same mask as naive.dropout_mask: element (i, j) is kept iff hash(seed, i, j) < threshold.
inline bool kept(uint32_t row_hash, int64_t col, uint32_t threshold) {
  return (fmix32(row_hash + static_cast<uint32_t>(col)) >> (32 - kKeepBits)) < threshold;
}

inline uint32_t row_hash(int64_t row, int64_t seed) {
  return fmix32((static_cast<uint32_t>(row) * 0x9E3779B1u) ^ static_cast<uint32_t>(seed));
}

inline uint32_t keep_threshold(double p) {
  return static_cast<uint32_t>(std::llround((1.0 - p) * (1 << kKeepBits)));
}

// dst = drop(src) (accumulate=false) or dst += drop(src) (accumulate=true), rows in parallel;
// src's row i is row first_row + i of the whole batch (the mask is a function of the global row).
template <typename T>
void dropout_rows(const T* src, T* dst, int64_t rows, int64_t cols, int64_t first_row, double p, int64_t seed,
                  bool accumulate) {
  const uint32_t threshold = keep_threshold(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t h = row_hash(first_row + i, seed);
      const T* s = src + i * cols;
      T* d = dst + i * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const float v = kept(h, j, threshold) ? static_cast<float>(s[j]) * inv_keep : 0.f;
        d[j] = static_cast<T>(accumulate ? static_cast<float>(d[j]) + v : v);
      }
    }
  });
}

void dropout_into(const Tensor& src, Tensor& dst, double p, int64_t seed, bool accumulate, int64_t first_row = 0) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "lora_dropout", [&] {
    dropout_rows<scalar_t>(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), src.size(0), src.size(1), first_row,
                           p, seed, accumulate);
  });
}

Tensor dropped(const Tensor& x, double p, int64_t seed, int64_t first_row = 0) {
  if (p == 0.0) return x;
  Tensor out = at::empty_like(x);
  dropout_into(x, out, p, seed, false, first_row);
  return out;
}

// Runs body(first_row, rows, thread) on one contiguous block of rows per thread, all in one
// parallel region. The rank-r GEMMs are too thin to keep two MKL threads busy: one block of rows
// per thread, each through single-threaded GEMMs, replaces six short parallel regions with one —
// which matters most on a loaded machine, where every region waits for its slowest thread.
struct RowBlocks {
  int64_t size, count;  // rows per block; blocks, every one non-empty
};

RowBlocks row_blocks(int64_t rows) {
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  const int64_t size = std::max<int64_t>(1, (rows + wanted - 1) / wanted);
  // ceil(rows / size) can be fewer than `wanted` (37 rows, 16 threads: 3 rows each, 13 blocks); a
  // block count of `wanted` would leave per-block partial gradients unwritten.
  return {size, std::max<int64_t>(1, (rows + size - 1) / size)};
}

template <typename Body>
void for_row_blocks(int64_t rows, Body body) {
  const RowBlocks blocks = row_blocks(rows);
  at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * blocks.size, count = std::min(blocks.size, rows - first);
      if (count > 0) body(first, count, t);
    }
  });
}

// Rows per chunk that a thread takes through all of a pass's GEMMs in turn: their outputs (128 x
// 1536 floats at SmolLM2's MLP, 0.8 MB) are still cached when the branch adds into them, where a whole
// block's would be read back from memory.
constexpr int64_t kCacheRows = 128;

Tensor base_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

// scale * sum of the per-thread partial gradients parts[t], in one serial pass: they are small
// (r x in), and an ATen reduction would open one more parallel region.
Tensor sum_parts(const Tensor& parts, double scale) {
  Tensor out = at::empty(parts.sizes().slice(1), parts.options());
  const int64_t count = parts.size(0), size = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, parts.scalar_type(), "lora_sum_parts", [&] {
    const scalar_t* src = parts.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < size; ++i) {
      float acc = 0.f;
      for (int64_t t = 0; t < count; ++t) acc += static_cast<float>(src[t * size + i]);
      dst[i] = static_cast<scalar_t>(acc * static_cast<float>(scale));
    }
  });
  return out;
}

// ---- single adapter -------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> lora_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                        const Tensor& lora_a, const Tensor& lora_b, double scale, double p,
                                        int64_t seed) {
  Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  Tensor u = at::empty({x.size(0), lora_a.size(0)}, x.options());  // (N, r): all the branch keeps
  // A contiguous (in, r) Aᵀ: MKL runs x Aᵀ ~2x faster from it than from A's transposed view.
  const Tensor a_t = lora_a.t().contiguous(), b_t = lora_b.t(), w_t = weight.t();
  for_row_blocks(x.size(0), [&](int64_t first, int64_t rows, int64_t) {
    for (int64_t c = first; c < first + rows; c += kCacheRows) {
      const int64_t n = std::min(kCacheRows, first + rows - c);
      Tensor ys = y.narrow(0, c, n), us = u.narrow(0, c, n), xs = x.narrow(0, c, n);
      if (bias.has_value()) at::addmm_out(ys, *bias, xs, w_t);
      else at::mm_out(ys, xs, w_t);
      at::mm_out(us, dropped(xs, p, seed, c), a_t);
      ys.addmm_(us, b_t, 1.0, scale);  // the branch lands in y: no (N, out) temporary
    }
  });
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor> lora_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                 const Tensor& lora_a, const Tensor& lora_b, const Tensor& u,
                                                 double scale, double p, int64_t seed) {
  Tensor dx = at::empty({grad_y.size(0), weight.size(1)}, grad_y.options());
  // Per chunk of rows (cached from one GEMM to the next): dx = dy W, g = s dy B (N, r),
  // dx += drop'(g A), and this thread's partial dA += gᵀ drop(x) and dBᵀ += uᵀ dy, summed after.
  // Operands in the layouts MKL runs fastest here (B and Aᵀ column-major, dB as (uᵀ dy)ᵀ).
  const int64_t blocks = row_blocks(x.size(0)).count;
  // Zeroed: the chunks add into them, and with no rows at all no block writes its part.
  Tensor da_parts = at::zeros({blocks, lora_a.size(0), lora_a.size(1)}, lora_a.options());
  Tensor dbt_parts = at::zeros({blocks, lora_b.size(1), lora_b.size(0)}, lora_b.options());
  const Tensor b_cols = lora_b.t().contiguous().t(), a_cols = lora_a.t().contiguous().t();
  for_row_blocks(x.size(0), [&](int64_t first, int64_t rows, int64_t t) {
    Tensor da_t = da_parts[t], dbt_t = dbt_parts[t];
    for (int64_t c = first; c < first + rows; c += kCacheRows) {
      const int64_t n = std::min(kCacheRows, first + rows - c);
      Tensor dy = grad_y.narrow(0, c, n), dxs = dx.narrow(0, c, n);
      at::mm_out(dxs, dy, weight);
      Tensor g = at::mm(dy, b_cols).mul_(scale);
      if (p == 0.0) {
        dxs.addmm_(g, a_cols);
      } else {
        dropout_into(at::mm(g, a_cols), dxs, p, seed, true, c);
      }
      da_t.addmm_(g.t(), dropped(x.narrow(0, c, n), p, seed, c));
      dbt_t.addmm_(u.narrow(0, c, n).t(), dy);
    }
  });
  Tensor da = sum_parts(da_parts, 1.0);
  Tensor db = sum_parts(dbt_parts, scale).t().contiguous();
  return {dx, da, db};
}

// ---- many adapters ------------------------------------------------------------------------------

struct Segment {
  int64_t adapter, start, length;
};

// Non-empty adapter segments, largest first (so a dynamic schedule balances uneven ones).
std::vector<Segment> segments_of(const Tensor& offsets) {
  const int64_t* o = offsets.data_ptr<int64_t>();
  std::vector<Segment> segs;
  for (int64_t a = 0; a + 2 < offsets.numel(); ++a)
    if (o[a + 2] > o[a + 1]) segs.push_back({a, o[a + 1], o[a + 2] - o[a + 1]});
  std::sort(segs.begin(), segs.end(), [](const Segment& l, const Segment& r) { return l.length > r.length; });
  return segs;
}

// Runs body(segment) for every segment: across threads (each GEMM single-threaded, since ATen
// runs ops serially inside a parallel region; largest segments first, taken from a shared counter)
// when there are many, else one after another with multithreaded GEMMs. Worker threads do not
// inherit the caller's no-grad mode, hence the guard (the tensors here may require grad).
template <typename Body>
void for_segments(const std::vector<Segment>& segs, Body body) {
  const int64_t threads = at::get_num_threads();
  const int64_t count = static_cast<int64_t>(segs.size());
  if (threads > 1 && count >= 2 * threads) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      at::NoGradGuard no_grad;
      for (int64_t s = next++; s < count; s = next++) body(segs[s]);
    });
  } else {
    for (const Segment& s : segs) body(s);
  }
}

// Zeroes the gradients of adapters no row uses (every used one is written whole by its segment).
void zero_unused(Tensor& da, Tensor& db, const std::vector<Segment>& segs) {
  std::vector<bool> used(da.size(0), false);
  for (const Segment& seg : segs) used[seg.adapter] = true;
  for (int64_t a = 0; a < da.size(0); ++a) {
    if (used[a]) continue;
    da[a].zero_();
    db[a].zero_();
  }
}

// A segment's rows in the batch: perm[start:start+length], increasing (the sort is stable). When
// they are one contiguous range (adapters assigned per sequence, in order) they are read and
// written in place; otherwise gathered per segment and added back with index_add_.
struct SegmentRows {
  Tensor index;
  int64_t first;
  bool contiguous;

  SegmentRows(const Tensor& perm, const Segment& seg) : index(perm.narrow(0, seg.start, seg.length)) {
    const int64_t* p = perm.data_ptr<int64_t>() + seg.start;
    first = p[0];
    contiguous = p[seg.length - 1] - p[0] == seg.length - 1;
  }
  Tensor read(const Tensor& t) const {
    return contiguous ? t.narrow(0, first, index.numel()) : t.index_select(0, index);
  }
  // dst[rows] += alpha * a @ b
  void add_product(Tensor& dst, const Tensor& a, const Tensor& b, double alpha) const {
    if (contiguous) {
      dst.narrow(0, first, index.numel()).addmm_(a, b, 1.0, alpha);
    } else {
      dst.index_add_(0, index, at::mm(a, b), alpha);
    }
  }
};

std::tuple<Tensor, Tensor> multi_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                         const Tensor& lora_a, const Tensor& lora_b, const Tensor& scales,
                                         const Tensor& perm, const Tensor& offsets) {
  Tensor y = base_forward(x, weight, bias);
  Tensor u = at::empty({x.size(0), lora_a.size(1)}, x.options());  // in sorted row order
  u.narrow(0, 0, offsets.data_ptr<int64_t>()[1]).zero_();           // the rows without an adapter
  const float* s = scales.data_ptr<float>();
  for_segments(segments_of(offsets), [&](const Segment& seg) {
    const SegmentRows rows(perm, seg);
    Tensor us = u.narrow(0, seg.start, seg.length);
    at::mm_out(us, rows.read(x), lora_a[seg.adapter].t().contiguous());
    rows.add_product(y, us, lora_b[seg.adapter].t(), s[seg.adapter]);  // rows are disjoint across segments
  });
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor> multi_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                  const Tensor& lora_a, const Tensor& lora_b, const Tensor& scales,
                                                  const Tensor& perm, const Tensor& offsets, const Tensor& u) {
  Tensor dx = at::mm(grad_y, weight);
  Tensor da = at::empty_like(lora_a), db = at::empty_like(lora_b);
  const std::vector<Segment> segs = segments_of(offsets);
  zero_unused(da, db, segs);
  const float* s = scales.data_ptr<float>();
  for_segments(segs, [&](const Segment& seg) {
    const SegmentRows rows(perm, seg);
    Tensor dy = rows.read(grad_y);
    Tensor g = at::mm(dy, lora_b[seg.adapter]).mul_(s[seg.adapter]);
    rows.add_product(dx, g, lora_a[seg.adapter], 1.0);
    Tensor da_a = da[seg.adapter], db_a = db[seg.adapter];
    at::mm_out(da_a, g.t(), rows.read(x));
    db_a.copy_(at::mm(u.narrow(0, seg.start, seg.length).t(), dy).mul_(s[seg.adapter]).t());
  });
  return {dx, da, db};
}

Tensor dropout(const Tensor& x, double p, int64_t seed) { return dropped(x, p, seed).clone(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU backend of the LoRA ops (see engram_kernels/ops/lora/naive.py)";
  m.def("lora_forward", &lora_forward, "(y, u): y = x W^T + s (drop(x) A^T) B^T (+ bias)");
  m.def("lora_backward", &lora_backward, "(dx, dA, dB) of lora_forward");
  m.def("multi_forward", &multi_forward, "(y, u_sorted): many adapters, one segment of rows each");
  m.def("multi_backward", &multi_backward, "(dx, dA, dB) of multi_forward");
  m.def("dropout", &dropout, "drop(x) with the hash mask of naive.dropout_mask");
}
