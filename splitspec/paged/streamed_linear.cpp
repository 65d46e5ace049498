// splitspec::streamed_linear: y = x W^T + b for the few rows of a decode or verify step, on the CPU.
//
// Such a step multiplies a few rows by every weight once, so it is bound by reading the weights
// from memory. The weight is packed once into panels of kPanel output columns, each panel's K rows
// of kPanel floats one after another ([panels, K, kPanel]), so that a panel is one sequential
// stream; each k loads one row of the panel and multiplies it into up to kTileRows rows of x held
// in registers, and a software prefetch runs kPrefetchBytes ahead into L2. Rows past kTileRows are
// further tiles over the same panel, read again from cache. On a 4th-gen Xeon core (float32,
// 190 MB of weights) this streamed at 1.2x oneDNN's packed GEMM for one row and 1.02-1.1x from
// 4 to 32 rows (README, forward cost).
#include <torch/extension.h>

#include "parallel_threads.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

namespace {

#if defined(CPU_CAPABILITY_AVX512)
using Reg = __m512;
inline Reg load(const float* p) { return _mm512_loadu_ps(p); }
inline Reg splat(float v) { return _mm512_set1_ps(v); }
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
inline Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
inline void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
inline Reg zero() { return _mm512_setzero_ps(); }
constexpr int64_t kTileRows = 12;  // 2 x 12 accumulators of 32 registers
#elif defined(CPU_CAPABILITY_AVX2)
using Reg = __m256;
inline Reg load(const float* p) { return _mm256_loadu_ps(p); }
inline Reg splat(float v) { return _mm256_set1_ps(v); }
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
inline Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
inline void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
inline Reg zero() { return _mm256_setzero_ps(); }
constexpr int64_t kTileRows = 6;  // 2 x 6 accumulators of 16 registers
#else
#error "streamed_linear needs AVX-512 or AVX2"
#endif

constexpr int64_t kLanes = sizeof(Reg) / sizeof(float);
constexpr int64_t kPanel = 2 * kLanes;                // output columns of a panel: two registers
constexpr int64_t kPrefetchBytes = 16 * 1024;        // how far ahead of the loads the prefetch runs
constexpr int64_t kPrefetchRows = kPrefetchBytes / (kPanel * 4);
constexpr int64_t kLineFloats = 16;                  // a 64-byte cache line

// rows x [rows, K] (row stride ldx) times one panel [K, kPanel] -> y [rows, columns] (stride ldy).
template <int64_t rows>
inline void multiply_panel(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias,
                           float* y, int64_t ldy, int64_t columns) {
  Reg low[rows], high[rows];
#pragma GCC unroll 16
  for (int64_t m = 0; m < rows; ++m) low[m] = high[m] = zero();
  for (int64_t k = 0; k < K; ++k) {
    const float* row = panel + k * kPanel;
#pragma GCC unroll 2
    for (int64_t line = 0; line < kPanel; line += kLineFloats)
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * kPanel + line), _MM_HINT_T1);
    const Reg w_low = load(row), w_high = load(row + kLanes);
#pragma GCC unroll 16
    for (int64_t m = 0; m < rows; ++m) {
      const Reg a = splat(x[m * ldx + k]);
      low[m] = fmadd(a, w_low, low[m]);
      high[m] = fmadd(a, w_high, high[m]);
    }
  }
  float spill[kPanel];
#pragma GCC unroll 16
  for (int64_t m = 0; m < rows; ++m) {
    if (bias != nullptr) {
      low[m] = add(low[m], load(bias));
      high[m] = add(high[m], load(bias + kLanes));
    }
    float* out = columns == kPanel ? y + m * ldy : spill;
    store(out, low[m]);
    store(out + kLanes, high[m]);
    if (columns != kPanel) std::copy(spill, spill + columns, y + m * ldy);
  }
}

using PanelKernel = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t);

template <int64_t... rows>
constexpr auto panel_kernels(std::integer_sequence<int64_t, rows...>) {
  return std::array<PanelKernel, sizeof...(rows)>{&multiply_panel<rows + 1>...};
}

constexpr auto kKernels = panel_kernels(std::make_integer_sequence<int64_t, kTileRows>{});

// weight: [N, K] float32 -> [panels, K, kPanel], output columns past N zero.
at::Tensor pack_streamed_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack_streamed_weight: a float32 [N, K] weight expected");
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, kPanel, K}).transpose(1, 2).contiguous();
}

// input: [..., K] float32; packed: pack_streamed_weight of a [N, K] weight; bias: [N] -> [..., N].
at::Tensor streamed_linear(const at::Tensor& input, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                           int64_t out_features) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "streamed_linear: float32 input and weight expected");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "streamed_linear: a weight from pack_streamed_weight expected");
  const int64_t K = input.size(-1), N = out_features, panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && panels * kPanel >= N && panels * kPanel < N + kPanel,
              "streamed_linear: the packed weight's shape does not match the input and out_features");
  auto x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "streamed_linear: bias of out_features values expected");
    b = at::zeros({panels * kPanel}, x.options());  // padded, so a panel's bias loads whole
    b.narrow(0, 0, N).copy_(bias->reshape({N}));
  }
  const float* xs = x.data_ptr<float>();
  const float* ws = packed.data_ptr<float>();
  const float* bs = b.defined() ? b.data_ptr<float>() : nullptr;
  float* ys = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p * kPanel, columns = std::min(kPanel, N - n);
      for (int64_t m = 0; m < M; m += kTileRows) {
        const int64_t rows = std::min(kTileRows, M - m);
        kKernels[rows - 1](xs + m * K, K, ws + p * K * kPanel, K, bs ? bs + n : nullptr, ys + m * N + n, N, columns);
      }
    }
  });
  auto sizes = input.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitspec, m) {
  m.def("streamed_linear_threads() -> int", &splitspec_kernels::parallel_threads);
  m.def("pack_streamed_weight(Tensor weight) -> Tensor");
  m.def("streamed_linear(Tensor input, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitspec, CPU, m) {
  m.impl("pack_streamed_weight", &pack_streamed_weight);
  m.impl("streamed_linear", &streamed_linear);
}
