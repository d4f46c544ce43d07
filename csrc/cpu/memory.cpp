// CPU kernels for the product-key memory ops. All arithmetic is fp32 (bf16/fp16 are storage
// formats only: bf16 compute is ~13x slower than fp32 on AVX2-only machines); work is split
// across rows with at::parallel_for (OpenMP).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // exact; vectorizes, unlike a library call
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = to_float(src[i]);
}

// acc[i] += w * row[i]
template <typename T>
inline void axpy(float w, const T* row, float* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] += w * to_float(row[i]);
}

// acc[i] += w0 * r0[i] + ... + w3 * r3[i]: four rows per pass cut the accumulator traffic 4x.
template <typename T>
inline void axpy4(const float* w, const T* r0, const T* r1, const T* r2, const T* r3, float* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i)
    acc[i] += w[0] * to_float(r0[i]) + w[1] * to_float(r1[i]) + w[2] * to_float(r2[i]) + w[3] * to_float(r3[i]);
}

template <typename T>
inline float dot(const T* row, const float* g, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)  // lets the compiler reorder the sum into vector lanes
  for (int64_t i = 0; i < d; ++i) s += to_float(row[i]) * g[i];
  return s;
}

// ---- product-key selection --------------------------------------------------------------------

// Keeps the k largest (value, index) pairs seen, sorted descending; ties keep the earlier one.
struct TopK {
  int64_t k, size = 0;
  float* val;
  int64_t* idx;
  void push(float v, int64_t i) {
    if (size == k && !(v > val[k - 1])) return;
    int64_t pos = size < k ? size++ : k - 1;
    while (pos > 0 && v > val[pos - 1]) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = i;
  }
};

// Top k of one row, descending, ties to the lower index: a threshold by nth_element (linear time),
// then a sort of the k survivors. `scratch` holds n floats.
void row_topk(const float* row, int64_t n, int64_t k, float* val, int64_t* idx, float* scratch) {
  std::copy(row, row + n, scratch);
  std::nth_element(scratch, scratch + k - 1, scratch + n, std::greater<float>());
  const float threshold = scratch[k - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += row[i] > threshold;
  int64_t count = 0, ties_left = k - above;
  for (int64_t i = 0; i < n && count < k; ++i)
    if (row[i] > threshold || (row[i] == threshold && ties_left-- > 0)) idx[count++] = i;
  std::sort(idx, idx + k, [row](int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
  for (int64_t i = 0; i < k; ++i) val[i] = row[idx[i]];
}

void select_row(const float* s1, const float* s2, int64_t n_keys, int64_t k, float* out_scores,
                int64_t* out_ids, float* buf_val, int64_t* buf_idx, float* scratch) {
  float *v1 = buf_val, *v2 = buf_val + k;
  int64_t *i1 = buf_idx, *i2 = buf_idx + k;
  row_topk(s1, n_keys, k, v1, i1, scratch);
  row_topk(s2, n_keys, k, v2, i2, scratch);
  // Both halves are sorted: pair (a, b) is beaten by the (a+1)(b+1)-1 pairs (a'<=a, b'<=b), so
  // only pairs with (a+1)(b+1) <= k can be in the top k.
  TopK best{k, 0, out_scores, out_ids};
  for (int64_t a = 0; a < k; ++a)
    for (int64_t b = 0; (a + 1) * (b + 1) <= k; ++b) best.push(v1[a] + v2[b], i1[a] * n_keys + i2[b]);
}

std::vector<torch::Tensor> pk_select(torch::Tensor s1, torch::Tensor s2, int64_t k) {
  TORCH_CHECK(s1.dtype() == torch::kFloat32 && s2.dtype() == torch::kFloat32, "sub-scores must be fp32");
  TORCH_CHECK(s1.is_contiguous() && s2.is_contiguous() && s1.sizes() == s2.sizes() && s1.dim() == 3);
  const int64_t n_keys = s1.size(2), rows = s1.size(0) * s1.size(1);
  TORCH_CHECK(k >= 1 && k <= n_keys, "k must be in [1, n_keys]");
  auto scores = torch::empty({s1.size(0), s1.size(1), k}, s1.options());
  auto ids = torch::empty({s1.size(0), s1.size(1), k}, s1.options().dtype(torch::kInt64));
  const float *p1 = s1.data_ptr<float>(), *p2 = s2.data_ptr<float>();
  float* ps = scores.data_ptr<float>();
  int64_t* pi = ids.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> val(2 * k), scratch(n_keys);
    std::vector<int64_t> idx(2 * k);
    for (int64_t r = begin; r < end; ++r)
      select_row(p1 + r * n_keys, p2 + r * n_keys, n_keys, k, ps + r * k, pi + r * k, val.data(), idx.data(),
                 scratch.data());
  });
  return {scores, ids};
}

// ---- weighted gather --------------------------------------------------------------------------

template <typename V, typename W>
void gather_forward(const V* values, const int64_t* ids, const W* weights, V* out, int64_t n, int64_t l,
                    int64_t d) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t* row_ids = ids + t * l;
      int64_t j = 0;
      for (; j + 4 <= l; j += 4) {
        for (int64_t p = j + 4; p < std::min(j + 8, l); ++p) __builtin_prefetch(values + row_ids[p] * d);
        const float w[4] = {to_float(weights[t * l + j]), to_float(weights[t * l + j + 1]),
                            to_float(weights[t * l + j + 2]), to_float(weights[t * l + j + 3])};
        axpy4(w, values + row_ids[j] * d, values + row_ids[j + 1] * d, values + row_ids[j + 2] * d,
              values + row_ids[j + 3] * d, acc.data(), d);
      }
      for (; j < l; ++j) axpy(to_float(weights[t * l + j]), values + row_ids[j] * d, acc.data(), d);
      for (int64_t i = 0; i < d; ++i) out[t * d + i] = static_cast<V>(acc[i]);
    }
  });
}

torch::Tensor weighted_gather(torch::Tensor values, torch::Tensor ids, torch::Tensor weights) {
  const int64_t n = ids.size(0), l = ids.size(1), d = values.size(1);
  auto out = torch::empty({n, d}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "gather_fwd", [&] {
    using V = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights.scalar_type(), "gather_fwd_w", [&] {
      gather_forward<V, scalar_t>(values.data_ptr<V>(), ids.data_ptr<int64_t>(), weights.data_ptr<scalar_t>(),
                                  out.data_ptr<V>(), n, l, d);
    });
  });
  return out;
}

// grad_weights[t, j] = <values[ids[t, j]], grad_out[t]>
template <typename V, typename W>
void weights_grad(const V* values, const int64_t* ids, const float* g, W* grad_w, int64_t n, int64_t l, int64_t d) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j = 0; j < l; ++j) {
        if (j + 4 < l) __builtin_prefetch(values + ids[t * l + j + 4] * d);
        grad_w[t * l + j] = static_cast<W>(dot(values + ids[t * l + j] * d, g + t * d, d));
      }
  });
}

// Groups the flattened lookups by slot with a counting sort: rows (sorted unique slots), offsets
// (U+1) into `order`, the lookup indices grouped per row. Needs n_slots ints, never n_slots x Dv.
struct Segments {
  torch::Tensor rows;
  std::vector<int64_t> offsets, order;
};

Segments group_by_slot(const int64_t* ids, int64_t m, int64_t n_slots) {
  std::vector<int32_t> slot_pos(n_slots, 0);
  for (int64_t e = 0; e < m; ++e) ++slot_pos[ids[e]];
  Segments seg;
  std::vector<int64_t> unique_rows;
  seg.offsets.push_back(0);
  for (int64_t s = 0; s < n_slots; ++s) {
    if (slot_pos[s] == 0) continue;
    unique_rows.push_back(s);
    const int64_t count = slot_pos[s];
    slot_pos[s] = static_cast<int32_t>(unique_rows.size() - 1);  // now: slot -> row number
    seg.offsets.push_back(seg.offsets.back() + count);
  }
  std::vector<int64_t> cursor(seg.offsets.begin(), seg.offsets.end() - 1);
  seg.order.resize(m);
  for (int64_t e = 0; e < m; ++e) seg.order[cursor[slot_pos[ids[e]]]++] = e;
  seg.rows = torch::tensor(unique_rows, torch::dtype(torch::kInt64));
  return seg;
}

template <typename V, typename W>
void rows_grad(const Segments& seg, const W* weights, const float* g, V* row_grads, int64_t l, int64_t d) {
  const int64_t u = seg.rows.numel();
  at::parallel_for(0, u, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = seg.offsets[r]; p < seg.offsets[r + 1]; ++p) {
        const int64_t e = seg.order[p];
        axpy(to_float(weights[e]), g + (e / l) * d, acc.data(), d);
      }
      for (int64_t i = 0; i < d; ++i) row_grads[r * d + i] = static_cast<V>(acc[i]);
    }
  });
}

std::vector<torch::Tensor> weighted_gather_backward(torch::Tensor grad_out, torch::Tensor values, torch::Tensor ids,
                                                    torch::Tensor weights) {
  const int64_t n = ids.size(0), l = ids.size(1), d = values.size(1);
  auto g = grad_out.to(torch::kFloat32).contiguous();
  auto grad_w = torch::empty_like(weights);
  Segments seg = group_by_slot(ids.data_ptr<int64_t>(), n * l, values.size(0));
  auto row_grads = torch::empty({seg.rows.numel(), d}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "gather_bwd", [&] {
    using V = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights.scalar_type(), "gather_bwd_w", [&] {
      weights_grad<V, scalar_t>(values.data_ptr<V>(), ids.data_ptr<int64_t>(), g.data_ptr<float>(),
                                grad_w.data_ptr<scalar_t>(), n, l, d);
      rows_grad<V, scalar_t>(seg, weights.data_ptr<scalar_t>(), g.data_ptr<float>(), row_grads.data_ptr<V>(), l, d);
    });
  });
  return {grad_w, seg.rows, row_grads};
}

// ---- fused sparse optimizer steps -------------------------------------------------------------

template <typename F>
void for_allowed_rows(const torch::Tensor& rows, const c10::optional<torch::Tensor>& allow_mask, F&& body) {
  const int64_t* r = rows.data_ptr<int64_t>();
  const bool* mask = allow_mask.has_value() ? allow_mask->data_ptr<bool>() : nullptr;
  at::parallel_for(0, rows.numel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u)
      if (mask == nullptr || mask[r[u]]) body(u, r[u]);
  });
}

void sparse_sgd_step(torch::Tensor values, torch::Tensor rows, torch::Tensor grads, double lr, double weight_decay,
                     c10::optional<torch::Tensor> allow_mask) {
  const int64_t d = values.size(1);
  auto g = grads.to(torch::kFloat32).contiguous();
  const float* pg = g.data_ptr<float>();
  const float flr = lr, fwd = weight_decay;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "sgd_step", [&] {
    scalar_t* pv = values.data_ptr<scalar_t>();
    for_allowed_rows(rows, allow_mask, [&](int64_t u, int64_t row) {
      scalar_t* v = pv + row * d;
      for (int64_t i = 0; i < d; ++i) {
        const float x = to_float(v[i]);
        v[i] = static_cast<scalar_t>(x - flr * (pg[u * d + i] + fwd * x));
      }
    });
  });
}

void sparse_adam_step(torch::Tensor values, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor rows,
                      torch::Tensor grads, int64_t step, double lr, double beta1, double beta2, double eps,
                      double weight_decay, c10::optional<torch::Tensor> allow_mask) {
  const int64_t d = values.size(1);
  auto g = grads.to(torch::kFloat32).contiguous();
  const float* pg = g.data_ptr<float>();
  float* pm = exp_avg.data_ptr<float>();
  float* ps = exp_avg_sq.data_ptr<float>();
  const float b1 = beta1, b2 = beta2, feps = eps, flr = lr, decay = 1.0 - lr * weight_decay;
  const float bias1 = 1.0 - std::pow(beta1, step), bias2 = 1.0 - std::pow(beta2, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "adam_step", [&] {
    scalar_t* pv = values.data_ptr<scalar_t>();
    for_allowed_rows(rows, allow_mask, [&](int64_t u, int64_t row) {
      scalar_t* v = pv + row * d;
      float *m = pm + row * d, *s = ps + row * d;
      const float* gr = pg + u * d;
      for (int64_t i = 0; i < d; ++i) {
        m[i] = b1 * m[i] + (1.f - b1) * gr[i];
        s[i] = b2 * s[i] + (1.f - b2) * gr[i] * gr[i];
        const float update = (m[i] / bias1) / (std::sqrt(s[i] / bias2) + feps);
        v[i] = static_cast<scalar_t>(to_float(v[i]) * decay - flr * update);
      }
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engram_kernels CPU kernels (fp32 compute, OpenMP)";
  m.def("pk_select", &pk_select, "top-k product-key slots from fp32 sub-scores");
  m.def("weighted_gather", &weighted_gather);
  m.def("weighted_gather_backward", &weighted_gather_backward);
  m.def("sparse_sgd_step", &sparse_sgd_step);
  m.def("sparse_adam_step", &sparse_adam_step);
}
