// splitspec::paged_attention: attention of packed new tokens over the paged KV pool, on the CPU.
//
// Each new token's query reads its sequence's keys and values where they lie in the pool, block
// by block through the block table: no gathered copy of the context (the gather wrote and read
// the context twice more than attention needs; at 16 sequences of 200 tokens that was most of a
// step's memory traffic beside the weights). Causal by absolute position, a sliding window and
// a logit soft-cap as the layer asks; grouped-query heads share each key and value load.
#include <torch/extension.h>

#include "parallel_threads.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// The row `source` (`dim` values) as floats in `buffer`; a float row is used where it lies.
template <typename scalar_t>
inline const float* as_floats(const scalar_t* source, float* buffer, int64_t dim) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return source;
  } else {
    for (int64_t d = 0; d < dim; ++d) buffer[d] = static_cast<float>(source[d]);
    return buffer;
  }
}

inline float dot(const float* a, const float* b, int64_t dim) {
  int64_t d = 0;
  Vec sum(0.0f);
  for (; d + Vec::size() <= dim; d += Vec::size()) sum = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), sum);
#if defined(CPU_CAPABILITY_AVX512)
  float total = _mm512_reduce_add_ps(__m512(sum));
#else
  float lanes[Vec::size()];
  sum.store(lanes);
  float total = 0.0f;
  for (int64_t lane = 0; lane < Vec::size(); ++lane) total += lanes[lane];
#endif
  for (; d < dim; ++d) total += a[d] * b[d];
  return total;
}

inline void axpy(float weight, const float* x, float* y, int64_t dim) {
  int64_t d = 0;
  Vec w(weight);
  for (; d + Vec::size() <= dim; d += Vec::size()) at::vec::fmadd(w, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  for (; d < dim; ++d) y[d] += weight * x[d];
}

// scores[0 .. n) -> their softmax, in place (after a soft-cap: cap * tanh(score / cap), where cap > 0).
inline void softmax(float* scores, int64_t n, float cap) {
  int64_t j = 0;
  const int64_t whole = n - n % Vec::size();
  if (cap > 0) {
    const Vec c(cap), inverse(1.0f / cap);
    for (; j < whole; j += Vec::size()) (c * (Vec::loadu(scores + j) * inverse).tanh()).store(scores + j);
    for (; j < n; ++j) scores[j] = cap * std::tanh(scores[j] / cap);
  }
  Vec tops(-std::numeric_limits<float>::infinity());
  for (j = 0; j < whole; j += Vec::size()) tops = at::vec::maximum(tops, Vec::loadu(scores + j));
  float lanes[Vec::size()];
  tops.store(lanes);
  float top = *std::max_element(lanes, lanes + Vec::size());
  for (; j < n; ++j) top = std::max(top, scores[j]);
  Vec sums(0.0f);
  const Vec shift(top);
  for (j = 0; j < whole; j += Vec::size()) {
    const Vec e = (Vec::loadu(scores + j) - shift).exp();
    e.store(scores + j);
    sums = sums + e;
  }
  sums.store(lanes);
  float total = std::accumulate(lanes, lanes + Vec::size(), 0.0f);
  for (; j < n; ++j) total += (scores[j] = std::exp(scores[j] - top));
  const Vec scale(1.0f / total);
  for (j = 0; j < whole; j += Vec::size()) (Vec::loadu(scores + j) * scale).store(scores + j);
  for (; j < n; ++j) scores[j] /= total;
}

// Calls visit(position, slot) for positions first..last of a sequence, block by block.
template <typename Visit>
inline void for_each_slot(const int64_t* table, int64_t block_size, int64_t first, int64_t last, Visit visit) {
  for (int64_t block = first / block_size; block * block_size <= last; ++block) {
    const int64_t base = table[block] * block_size - block * block_size;  // slot of a position in this block
    const int64_t begin = std::max(first, block * block_size), end = std::min(last + 1, (block + 1) * block_size);
    for (int64_t position = begin; position < end; ++position) visit(position, base + position);
  }
}

// One work item: every query row (token x head) of a run of consecutive tokens of one sequence.
// Each position's keys (all kv heads: one contiguous row of the block) are loaded once for all of
// them, and the blocks are read in order, front to back.
// kDim: the head size where it is a compile-time constant (the loops over it unroll), else 0.
template <typename scalar_t, int64_t kDim>
void attend(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
            const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_pos, double scale,
            int64_t window, double softcap, at::Tensor& out) {
  const int64_t tokens = query.size(0), heads = query.size(1), dim = kDim > 0 ? kDim : query.size(2);
  const int64_t block_size = key_cache.size(1), kv_heads = key_cache.size(2);
  const int64_t groups = heads / kv_heads, max_blocks = block_tables.size(1);
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* keys = key_cache.data_ptr<scalar_t>();
  const scalar_t* values = value_cache.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seqs = token_seq.data_ptr<int64_t>();
  const int64_t* positions = token_pos.data_ptr<int64_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t slot_stride = kv_heads * dim;  // one position's keys, all kv heads
  std::vector<int64_t> runs{0};                // token t's run: runs[i] <= t < runs[i + 1]
  for (int64_t t = 1; t < tokens; ++t)
    if (seqs[t] != seqs[t - 1]) runs.push_back(t);
  runs.push_back(tokens);
  const int64_t num_runs = static_cast<int64_t>(runs.size()) - 1;
  const float cap = static_cast<float>(softcap);
  at::parallel_for(0, num_runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled, acc, scores, row(slot_stride);
    std::vector<int64_t> lows, highs, offsets;  // per row: its positions, its kv head's offset in a row of keys
    for (int64_t run = begin; run < end; ++run) {
      const int64_t first_token = runs[run], rows = (runs[run + 1] - first_token) * heads;  // row: token x head
      const int64_t* table = tables + seqs[first_token] * max_blocks;
      scaled.resize(rows * dim);
      lows.resize(rows);
      highs.resize(rows);
      offsets.resize(rows);
      int64_t first = std::numeric_limits<int64_t>::max(), last = -1;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = first_token + r / heads;
        const scalar_t* head = q + t * heads * dim + (r % heads) * dim;
        for (int64_t d = 0; d < dim; ++d) scaled[r * dim + d] = static_cast<float>(head[d]) * static_cast<float>(scale);
        highs[r] = positions[t];
        offsets[r] = (r % heads) / groups * dim;
        lows[r] = window > 0 ? std::max<int64_t>(0, positions[t] - window + 1) : 0;
        first = std::min(first, lows[r]);
        last = std::max(last, highs[r]);
      }
      const int64_t count = last + 1 - first;
      scores.assign(rows * count, 0.0f);
      for_each_slot(table, block_size, first, last, [&](int64_t position, int64_t slot) {
        const float* k = as_floats(keys + slot * slot_stride, row.data(), slot_stride);
        for (int64_t r = 0; r < rows; ++r)
          if (lows[r] <= position && position <= highs[r])
            scores[r * count + position - first] = dot(scaled.data() + r * dim, k + offsets[r], dim);
      });
      for (int64_t r = 0; r < rows; ++r) softmax(scores.data() + r * count + lows[r] - first, highs[r] - lows[r] + 1, cap);
      acc.assign(rows * dim, 0.0f);
      for_each_slot(table, block_size, first, last, [&](int64_t position, int64_t slot) {
        const float* v = as_floats(values + slot * slot_stride, row.data(), slot_stride);
        for (int64_t r = 0; r < rows; ++r)
          if (lows[r] <= position && position <= highs[r])
            axpy(scores[r * count + position - first], v + offsets[r], acc.data() + r * dim, dim);
      });
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* target = o + (first_token + r / heads) * heads * dim + (r % heads) * dim;
        for (int64_t d = 0; d < dim; ++d) target[d] = static_cast<scalar_t>(acc[r * dim + d]);
      }
    }
  });
}

// query: [T, heads, D]; key_cache / value_cache: [blocks, block_size, kv_heads, D];
// block_tables: [B, max_blocks] int64; token_seq / token_pos: [T] int64 (row of block_tables,
// absolute position) -> [T, heads, D]. window <= 0: no sliding window; softcap <= 0: none.
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_pos,
                           double scale, int64_t window, double softcap) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "paged_attention: query [T, heads, D] and caches [blocks, block_size, kv_heads, D] expected");
  TORCH_CHECK(query.size(2) == key_cache.size(3) && query.size(1) % key_cache.size(2) == 0,
              "paged_attention: head sizes differ, or heads are not a multiple of kv_heads");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && value_cache.scalar_type() == query.scalar_type(),
              "paged_attention: the caches' dtype differs from the query's");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "paged_attention: caches must be contiguous");
  auto q = query.contiguous();
  auto tables = block_tables.to(at::kLong).contiguous();
  auto seqs = token_seq.to(at::kLong).contiguous();
  auto positions = token_pos.to(at::kLong).contiguous();
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    switch (q.size(2)) {
      case 32: return attend<scalar_t, 32>(q, key_cache, value_cache, tables, seqs, positions, scale, window, softcap, out);
      case 64: return attend<scalar_t, 64>(q, key_cache, value_cache, tables, seqs, positions, scale, window, softcap, out);
      case 128: return attend<scalar_t, 128>(q, key_cache, value_cache, tables, seqs, positions, scale, window, softcap, out);
      default: return attend<scalar_t, 0>(q, key_cache, value_cache, tables, seqs, positions, scale, window, softcap, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(splitspec, m) {
  m.def("paged_attention_threads() -> int", &splitspec_kernels::parallel_threads);
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor token_seq, Tensor token_pos, float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitspec, CPU, m) { m.impl("paged_attention", &paged_attention); }
