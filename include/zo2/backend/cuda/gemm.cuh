// zo2/backend/cuda/gemm.cuh -- cuBLASLt matrix products for row-major activations and Hugging
// Face's [out, in] weights: Y = alpha X W^T (+ beta C) (+ bias) (ReLU), optionally strided-batched.
//
// Why cuBLASLt and not cublasGemmEx: its epilogues fuse the bias and the ReLU into the product,
// and beta C with C != D fuses a residual add, so a transformer block's Linear layers cost no
// extra pass over their outputs. Descriptors and the chosen algorithm are cached per shape
// (type, sizes, leading dimensions, batch strides, epilogue, pointer alignment): a steady-state
// step asks the heuristic nothing.
//
// Row-major to cuBLAS's column-major: a row-major [m, n] matrix with leading dimension ld is the
// column-major [n, m] matrix with the same ld, so Y = X W^T is computed as Y^T = W X^T with
// A = W (transposed for HF's [n, k] weights), B = X, D = Y, all without copies.
//
// Also here: the element types the CUDA kernels read and write (float, zo2::bfloat16,
// zo2::float16) and their device conversions, shared by the other kernel headers.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>

namespace zo2::gpu {

// ---- element types ------------------------------------------------------------------------------

template <class T>
inline constexpr bool is_kernel_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>;

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  static_assert(is_kernel_type_v<T>, "CUDA kernels support float, zo2::bfloat16 and zo2::float16");
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, bfloat16>) return CUDA_R_16BF;
  else return CUDA_R_16F;
}

template <class T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  else if constexpr (std::is_same_v<T, bfloat16>) return "bf16";
  else return "fp16";
}

/// Device conversions through the hardware instructions (half_types.hpp's are portable bit
/// manipulation, right but slower).
__device__ __forceinline__ float ld_f32(float x) { return x; }
__device__ __forceinline__ float ld_f32(bfloat16 x) { return __uint_as_float(static_cast<std::uint32_t>(x.bits) << 16); }
__device__ __forceinline__ float ld_f32(float16 x) {
  __half_raw r;
  r.x = x.bits;
  return __half2float(__half(r));
}
template <class T>
__device__ __forceinline__ T st_from_f32(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    const __nv_bfloat16_raw r = __float2bfloat16_rn(f);
    return bfloat16{r.x};
  } else {
    const __half_raw r = __float2half_rn(f);
    return float16{r.x};
  }
}

// ---- the GEMM ------------------------------------------------------------------------------------

/// One (optionally strided-batched) product in row-major terms:
///   Y[b] = alpha * X[b] op(W[b]) + beta * C[b] (+ bias[b]) (ReLU),  b < batch,
/// X[b]: [m, k] at x + b*stride_x (ld ldx); W[b]: [n, k] (w_transposed, HF's Linear weight) or
/// [k, n] at w + b*stride_w (ld ldw); Y[b], C[b]: [m, n] (ld ldy; C uses Y's ld and stride);
/// bias[b]: [n] at bias + b*stride_bias. Strides may be 0 (a shared operand).
template <class TIn, class TOut = TIn>
struct GemmArgs {
  std::int64_t m = 0, n = 0, k = 0;
  const TIn* x = nullptr;
  std::int64_t ldx = 0, stride_x = 0;
  const TIn* w = nullptr;
  std::int64_t ldw = 0, stride_w = 0;
  bool w_transposed = true;
  TOut* y = nullptr;
  std::int64_t ldy = 0, stride_y = 0;
  const TOut* c = nullptr;  // residual; null means beta = 0
  float alpha = 1.0f, beta = 0.0f;
  const TOut* bias = nullptr;
  std::int64_t stride_bias = 0;
  bool relu = false;
  int batch = 1;
};

class Gemm {
 public:
  static constexpr std::size_t kDefaultWorkspaceBytes = std::size_t{32} << 20;
  /// The most algorithms autotuning times per shape.
  static constexpr int kMaxAutotune = 16;

  explicit Gemm(std::size_t workspace_bytes = kDefaultWorkspaceBytes)
      : workspace_(workspace_bytes) {}
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  ~Gemm() {
    for (auto& [key, plan] : plans_) plan.destroy();
  }

  /// fp32 products use TF32 tensor cores when allowed; off by default, so fp32 is exact fp32
  /// (what the parity tests against float64 and transformers need).
  void set_allow_tf32(bool allow) { allow_tf32_ = allow; }
  bool allow_tf32() const { return allow_tf32_; }

  /// Autotuning: with candidates > 1, a shape's first run times up to that many of the
  /// heuristic's algorithms (at most kMaxAutotune) on its own operands (into a scratch output, so an in-place residual
  /// is never applied twice) and keeps the fastest; 0 or 1 takes the heuristic's first choice.
  /// Off by default: the choice depends on timing, so two processes may pick different kernels
  /// and round differently, and a resumed run would no longer repeat the original bit for bit.
  /// Applies to shapes first seen after the call. A run under stream capture is not tuned (it
  /// takes the first choice and tunes at its first run outside a capture).
  void set_autotune(int candidates) { autotune_ = candidates; }
  int autotune() const { return autotune_; }
  std::size_t cached_plans() const { return plans_.size(); }

  /// Enqueues the product on `stream`. Throws CudaError naming the shape when cuBLASLt has no
  /// algorithm for it (see try_run to fall back instead).
  template <class TIn, class TOut>
  void run(const GemmArgs<TIn, TOut>& a, cudaStream_t stream) {
    if (!try_run(a, stream))
      throw CudaError("cuBLASLt has no algorithm for " + describe(a));
  }

  /// As run(); returns false, enqueueing nothing, when cuBLASLt has no algorithm for the shape.
  template <class TIn, class TOut>
  bool try_run(const GemmArgs<TIn, TOut>& a, cudaStream_t stream) {
    validate(a);
    Plan& plan = plan_for(a);
    if (!plan.ok) return false;
    if (a.bias != nullptr) {
      const void* bias = a.bias;
      ZO2_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    if (!plan.tuned) tune(plan, a, stream);
    const float alpha = a.alpha, beta = a.c ? a.beta : 0.0f;
    const void* c = a.c ? static_cast<const void*>(a.c) : static_cast<const void*>(a.y);
    ZO2_CUBLAS_CHECK(cublasLtMatmul(handle_.get(), plan.op, &alpha, a.w, plan.a, a.x, plan.b, &beta, c, plan.c,
                                    a.y, plan.c, &plan.algo, workspace_.data(), workspace_.bytes(), stream));
    return true;
  }

  /// y[m, n] = x[m, k] w[n, k]^T (+ bias) (ReLU) (+ residual), contiguous row-major operands.
  template <class T>
  void linear(const T* x, const T* w, const T* bias, T* y, std::int64_t m, std::int64_t n, std::int64_t k,
              cudaStream_t stream, bool relu = false, const T* residual = nullptr) {
    GemmArgs<T, T> a;
    a.m = m, a.n = n, a.k = k;
    a.x = x, a.ldx = k;
    a.w = w, a.ldw = k;
    a.y = y, a.ldy = n;
    a.bias = bias;
    a.relu = relu;
    if (residual) a.c = residual, a.beta = 1.0f;
    run(a, stream);
  }

 private:
  struct Key {
    int tin, tout, compute;
    bool w_transposed, relu, bias, beta;
    std::int64_t m, n, k, ldx, ldw, ldy, stride_x, stride_w, stride_y, stride_bias;
    int batch;
    unsigned align_x, align_w, align_y, align_c;
    auto tie() const {
      return std::tie(tin, tout, compute, w_transposed, relu, bias, beta, m, n, k, ldx, ldw, ldy, stride_x, stride_w,
                      stride_y, stride_bias, batch, align_x, align_w, align_y, align_c);
    }
    bool operator<(const Key& o) const { return tie() < o.tie(); }
  };

  struct Plan {
    bool ok = false;
    bool tuned = true;  // false while autotuning candidates wait to be timed
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    cublasLtMatmulAlgo_t candidates[kMaxAutotune] = {};  // the heuristic's, best first (autotuning only)
    int num_candidates = 0;
    void destroy() noexcept {
      if (op) cublasLtMatmulDescDestroy(op);
      if (a) cublasLtMatrixLayoutDestroy(a);
      if (b) cublasLtMatrixLayoutDestroy(b);
      if (c) cublasLtMatrixLayoutDestroy(c);
      op = nullptr, a = b = c = nullptr;
    }
  };

  /// Largest power of two (<= 256) dividing the address and the batch stride, in bytes: what
  /// the heuristic may assume of every batch member's pointer.
  static unsigned alignment(const void* p, std::int64_t stride_elements, std::size_t element_bytes) {
    std::uint64_t v = reinterpret_cast<std::uintptr_t>(p) | 256u;
    if (stride_elements != 0) v |= static_cast<std::uint64_t>(stride_elements) * element_bytes;
    return static_cast<unsigned>(v & (~v + 1));
  }

  template <class TIn, class TOut>
  static std::string describe(const GemmArgs<TIn, TOut>& a) {
    return ::zo2::detail::concat("GEMM ", type_name<TIn>(), "->", type_name<TOut>(), " m=", a.m, " n=", a.n, " k=", a.k,
                          " ldx=", a.ldx, " ldw=", a.ldw, " ldy=", a.ldy, " batch=", a.batch,
                          a.w_transposed ? " (x w^T)" : " (x w)", a.bias ? " +bias" : "", a.relu ? " relu" : "",
                          a.c ? " +residual" : "");
  }

  template <class TIn, class TOut>
  static void validate(const GemmArgs<TIn, TOut>& a) {
    if (a.m <= 0 || a.n <= 0 || a.k <= 0 || a.batch <= 0)
      throw ShapeError("Gemm: non-positive size in " + describe(a));
    if (!a.x || !a.w || !a.y) throw ShapeError("Gemm: null operand in " + describe(a));
    if (a.ldx < a.k || a.ldy < a.n || a.ldw < (a.w_transposed ? a.k : a.n))
      throw ShapeError("Gemm: leading dimension smaller than the row in " + describe(a));
    if (a.stride_x < 0 || a.stride_w < 0 || a.stride_y < 0 || a.stride_bias < 0)
      throw ShapeError("Gemm: negative batch stride in " + describe(a));
  }

  template <class TIn, class TOut>
  Plan& plan_for(const GemmArgs<TIn, TOut>& a) {
    const bool tf32 = std::is_same_v<TIn, float> && allow_tf32_;
    const cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    Key key{static_cast<int>(cuda_data_type<TIn>()),
            static_cast<int>(cuda_data_type<TOut>()),
            static_cast<int>(compute),
            a.w_transposed,
            a.relu,
            a.bias != nullptr,
            a.c != nullptr,
            a.m, a.n, a.k, a.ldx, a.ldw, a.ldy, a.stride_x, a.stride_w, a.stride_y,
            a.bias ? a.stride_bias : 0,
            a.batch,
            alignment(a.x, a.stride_x, sizeof(TIn)),
            alignment(a.w, a.stride_w, sizeof(TIn)),
            alignment(a.y, a.stride_y, sizeof(TOut)),
            a.c ? alignment(a.c, a.stride_y, sizeof(TOut)) : alignment(a.y, a.stride_y, sizeof(TOut))};
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    Plan plan;
    try {
      build(plan, key, compute);
    } catch (...) {
      plan.destroy();
      throw;
    }
    return plans_.emplace(key, plan).first->second;
  }

  void build(Plan& p, const Key& key, cublasComputeType_t compute) {
    const auto tin = static_cast<cudaDataType_t>(key.tin), tout = static_cast<cudaDataType_t>(key.tout);
    ZO2_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, compute, CUDA_R_32F));
    const cublasOperation_t ta = key.w_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
    ZO2_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    ZO2_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
    if (key.bias) epi = key.relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
    else if (key.relu) epi = CUBLASLT_EPILOGUE_RELU;
    ZO2_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (key.bias) {
      const cudaDataType_t bias_type = tout;
      ZO2_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                      sizeof bias_type));
      if (key.batch > 1)
        ZO2_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                                                        &key.stride_bias, sizeof key.stride_bias));
    }
    // Column-major views: A = W ([k, n] ld ldw if transposed, else [n, k]), B = X ([k, m] ld
    // ldx), C = D = Y ([n, m] ld ldy).
    const std::uint64_t a_rows = key.w_transposed ? key.k : key.n, a_cols = key.w_transposed ? key.n : key.k;
    ZO2_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, tin, a_rows, a_cols, key.ldw));
    ZO2_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, tin, key.k, key.m, key.ldx));
    ZO2_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, tout, key.n, key.m, key.ldy));
    if (key.batch > 1) {
      auto batched = [&](cublasLtMatrixLayout_t l, std::int64_t stride) {
        const std::int32_t count = key.batch;
        ZO2_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
        ZO2_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                          sizeof stride));
      };
      batched(p.a, key.stride_w);
      batched(p.b, key.stride_x);
      batched(p.c, key.stride_y);
    }
    cublasLtMatmulPreference_t pref = nullptr;
    ZO2_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    struct PrefGuard {
      cublasLtMatmulPreference_t p;
      ~PrefGuard() { cublasLtMatmulPreferenceDestroy(p); }
    } guard{pref};
    const std::uint64_t ws = workspace_.bytes();
    ZO2_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const std::uint32_t al_a = key.align_w, al_b = key.align_x, al_c = key.align_c, al_d = key.align_y;
    ZO2_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a));
    ZO2_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b));
    ZO2_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c));
    ZO2_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof al_d));
    const int wanted = autotune_ > 1 ? (autotune_ < kMaxAutotune ? autotune_ : kMaxAutotune) : 1;
    cublasLtMatmulHeuristicResult_t results[kMaxAutotune] = {};
    int found = 0;
    const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle_.get(), p.op, p.a, p.b, p.c, p.c, pref, wanted,
                                                            results, &found);
    if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED)
      detail::throw_cublas(s, "cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__);
    p.ok = s == CUBLAS_STATUS_SUCCESS && found > 0;
    if (!p.ok) return;
    p.algo = results[0].algo;
    if (found > 1) {
      for (int i = 0; i < found; ++i)
        if (results[i].state == CUBLAS_STATUS_SUCCESS) p.candidates[p.num_candidates++] = results[i].algo;
      p.tuned = p.num_candidates < 2;
    }
  }

  /// Times each candidate (one warm-up, then kTimedRuns runs) on a's operands with the output in
  /// scratch, and keeps the fastest in plan.algo. Synchronizes `stream`.
  template <class TIn, class TOut>
  void tune(Plan& plan, const GemmArgs<TIn, TOut>& a, cudaStream_t stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    ZO2_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
    constexpr int kTimedRuns = 3;
    // D's span in elements, with Y's leading dimension and batch stride (Y's layout is D's).
    const std::int64_t span = (a.batch - 1) * a.stride_y + (a.m - 1) * a.ldy + a.n;
    DeviceBuffer<TOut> scratch(static_cast<std::size_t>(span));
    ZO2_CUDA_CHECK(cudaMemsetAsync(scratch.data(), 0, scratch.bytes(), stream));  // C when there is no residual
    const float alpha = a.alpha, beta = a.c ? a.beta : 0.0f;
    const void* c = a.c ? static_cast<const void*>(a.c) : static_cast<const void*>(scratch.data());
    Event start(true), stop(true);
    float best_ms = 0;
    int best = 0;
    bool any = false;
    for (int i = 0; i < plan.num_candidates; ++i) {
      auto run = [&] {
        return cublasLtMatmul(handle_.get(), plan.op, &alpha, a.w, plan.a, a.x, plan.b, &beta, c, plan.c,
                              scratch.data(), plan.c, &plan.candidates[i], workspace_.data(), workspace_.bytes(),
                              stream);
      };
      if (run() != CUBLAS_STATUS_SUCCESS) continue;  // an algorithm that refuses these operands
      start.record(stream);
      bool ok = true;
      for (int r = 0; r < kTimedRuns && ok; ++r) ok = run() == CUBLAS_STATUS_SUCCESS;
      stop.record(stream);
      stop.synchronize();
      if (!ok) continue;
      const float ms = stop.elapsed_ms_since(start);
      if (!any || ms < best_ms) best_ms = ms, best = i, any = true;
    }
    ZO2_CUDA_CHECK(cudaGetLastError());
    if (any) plan.algo = plan.candidates[best];
    plan.tuned = true;
  }

  CublasLtHandle handle_;
  DeviceBuffer<std::byte> workspace_;
  std::map<Key, Plan> plans_;
  bool allow_tf32_ = false;
  int autotune_ = 0;
};

}  // namespace zo2::gpu
