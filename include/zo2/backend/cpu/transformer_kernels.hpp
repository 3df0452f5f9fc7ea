// zo2/backend/cpu/transformer_kernels.hpp -- the CPU (Eigen) reference arithmetic of a
// decoder-only transformer (OPT and its kin): Linear,
// LayerNorm, activations, causal multi-head attention with a padding mask, and log-sum-exp.
//
// Activations are row-major [tokens, features] matrices, so a Hugging Face Linear weight
// [out, in] maps without a copy and y = x W^T is one GEMM. Reductions whose rounding matters
// (LayerNorm statistics, softmax normalizers, log-sum-exp) accumulate in double: the cost is
// nothing next to the GEMMs, and it keeps float32 results within a few ulps of PyTorch's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include <Eigen/Core>

namespace zo2::cpu::kernels {

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using ConstRowVectorMap = Eigen::Map<const RowVector<T>>;
/// Any row-major block with contiguous rows (a whole matrix or a range of its rows).
template <class T>
using ConstRowsRef = Eigen::Ref<const RowMatrix<T>>;

/// y = x W^T + b for a weight stored [out, in] row-major; `bias` may be null.
template <class T>
void linear(const ConstRowsRef<T>& x, const T* weight, const T* bias, Eigen::Index out_features,
            RowMatrix<T>& y) {
  const ConstMatrixMap<T> w(weight, out_features, x.cols());
  y.resize(x.rows(), out_features);
  y.noalias() = x * w.transpose();
  if (bias != nullptr) y.rowwise() += ConstRowVectorMap<T>(bias, out_features);
}

/// Row-wise LayerNorm with biased variance (as torch); weight/bias null means no affine.
/// Two-pass statistics in double: one pass (E[x^2] - E[x]^2) cancels catastrophically when
/// the mean is large next to the spread, which residual streams often are.
template <class T>
void layer_norm(const RowMatrix<T>& x, const T* weight, const T* bias, double eps, RowMatrix<T>& y) {
  const Eigen::Index n = x.cols();
  y.resize(x.rows(), n);
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    const T* in = x.data() + r * n;
    T* out = y.data() + r * n;
    double mean = 0;
    for (Eigen::Index i = 0; i < n; ++i) mean += static_cast<double>(in[i]);
    mean /= static_cast<double>(n);
    double var = 0;
    for (Eigen::Index i = 0; i < n; ++i) {
      const double d = static_cast<double>(in[i]) - mean;
      var += d * d;
    }
    var /= static_cast<double>(n);
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (Eigen::Index i = 0; i < n; ++i) {
      double v = (static_cast<double>(in[i]) - mean) * rstd;
      if (weight != nullptr) v = v * static_cast<double>(weight[i]) + static_cast<double>(bias[i]);
      out[i] = static_cast<T>(v);
    }
  }
}

enum class Activation { relu, gelu, gelu_tanh };

inline Activation parse_activation(const std::string& name) {
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_new") return Activation::gelu_tanh;
  return Activation::relu;  // OPTConfig::validate() has rejected anything else
}

template <class T>
void activate(RowMatrix<T>& x, Activation kind) {
  T* p = x.data();
  const Eigen::Index n = x.size();
  switch (kind) {
    case Activation::relu:
      for (Eigen::Index i = 0; i < n; ++i) p[i] = p[i] > T(0) ? p[i] : T(0);
      return;
    case Activation::gelu:  // x * Phi(x), the erf form torch's nn.GELU() computes
      for (Eigen::Index i = 0; i < n; ++i)
        p[i] = static_cast<T>(0.5 * p[i] * (1.0 + std::erf(static_cast<double>(p[i]) * M_SQRT1_2)));
      return;
    case Activation::gelu_tanh:  // HF's NewGELUActivation
      for (Eigen::Index i = 0; i < n; ++i) {
        const double v = p[i];
        p[i] = static_cast<T>(0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))));
      }
      return;
  }
}

/// Causal multi-head self-attention over `batch` sequences of `seq` tokens each.
/// q, k, v, context: [batch * seq, heads * head_dim]; key_mask[b * seq + j] != 0 when token j
/// of sequence b may be attended to. Query i attends to keys j <= i that are not masked.
///
/// A query with no visible key (a left-padding position sees only padding) attends uniformly
/// to all `seq` keys of its sequence, as transformers' eager attention does: there every score
/// of such a row is the dtype's minimum, so the softmax is flat. This matters beyond avoiding
/// 0/0: the last padding position predicts the first real token, and HF's causal-LM loss counts
/// that prediction when its label is not -100.
template <class T>
void causal_attention(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v,
                      std::size_t batch, std::size_t seq, std::size_t heads,
                      const std::uint8_t* key_mask, RowMatrix<T>& scores, RowMatrix<T>& context) {
  const Eigen::Index hidden = q.cols();
  const Eigen::Index head_dim = hidden / static_cast<Eigen::Index>(heads);
  const Eigen::Index s = static_cast<Eigen::Index>(seq);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  context.resize(q.rows(), hidden);
  scores.resize(s, s);
  for (std::size_t b = 0; b < batch; ++b) {
    const Eigen::Index row0 = static_cast<Eigen::Index>(b) * s;
    const std::uint8_t* visible = key_mask + b * seq;
    for (std::size_t h = 0; h < heads; ++h) {
      const Eigen::Index col0 = static_cast<Eigen::Index>(h) * head_dim;
      scores.noalias() = q.block(row0, col0, s, head_dim) * k.block(row0, col0, s, head_dim).transpose();
      for (Eigen::Index i = 0; i < s; ++i) {
        T* row = scores.data() + i * s;
        T max_score = -std::numeric_limits<T>::infinity();
        for (Eigen::Index j = 0; j <= i; ++j)
          if (visible[j]) max_score = std::max(max_score, row[j] * scale);
        if (max_score == -std::numeric_limits<T>::infinity()) {  // nothing visible
          std::fill(row, row + s, static_cast<T>(1.0 / static_cast<double>(s)));
          continue;
        }
        double sum = 0;
        for (Eigen::Index j = 0; j <= i; ++j) {
          const T p = visible[j] ? static_cast<T>(std::exp(row[j] * scale - max_score)) : T(0);
          row[j] = p;
          sum += static_cast<double>(p);
        }
        const T inv = static_cast<T>(1.0 / sum);
        for (Eigen::Index j = 0; j <= i; ++j) row[j] *= inv;
        std::fill(row + i + 1, row + s, T(0));
      }
      context.block(row0, col0, s, head_dim).noalias() = scores * v.block(row0, col0, s, head_dim);
    }
  }
}

/// log(sum_j exp(x_j)) of one row, in double.
template <class T>
double log_sum_exp(const T* x, Eigen::Index n) {
  double max_value = -std::numeric_limits<double>::infinity();
  for (Eigen::Index j = 0; j < n; ++j) max_value = std::max(max_value, static_cast<double>(x[j]));
  if (!std::isfinite(max_value)) return max_value;  // inf or NaN propagates; -inf row stays -inf
  double sum = 0;
  for (Eigen::Index j = 0; j < n; ++j) sum += std::exp(static_cast<double>(x[j]) - max_value);
  return max_value + std::log(sum);
}


// ---- the LLaMA family (LLaMA, Qwen2/3, Mistral): RMSNorm, rotary embeddings, SwiGLU, and
// grouped-query causal attention with an optional sliding window ------------------------------

/// RMSNorm of `rows` rows of `n` values, in place allowed (in == out), as HF's LlamaRMSNorm:
/// y = w * round_T(x / sqrt(mean(x^2) + eps)). The mean is taken in double; the normalized value
/// is rounded to T before the weight multiplies it, as HF casts back to the input dtype first.
/// `weight` may be null (no scale).
template <class T>
void rms_norm_rows(const T* in, T* out, std::size_t rows, std::size_t n, const T* weight, double eps) {
  for (std::size_t r = 0; r < rows; ++r) {
    const T* x = in + r * n;
    T* y = out + r * n;
    double sum_squares = 0;
    for (std::size_t i = 0; i < n; ++i) sum_squares += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    const double rstd = 1.0 / std::sqrt(sum_squares / static_cast<double>(n) + eps);
    for (std::size_t i = 0; i < n; ++i) {
      const T normalized = static_cast<T>(static_cast<double>(x[i]) * rstd);
      y[i] = weight != nullptr ? weight[i] * normalized : normalized;
    }
  }
}

/// Row-wise RMSNorm of a [rows, n] matrix (see rms_norm_rows).
template <class T>
void rms_norm(const RowMatrix<T>& x, const T* weight, double eps, RowMatrix<T>& y) {
  y.resize(x.rows(), x.cols());
  rms_norm_rows(x.data(), y.data(), static_cast<std::size_t>(x.rows()), static_cast<std::size_t>(x.cols()),
                weight, eps);
}

/// cos and sin of position p times each of the `half` inverse frequencies, for p in
/// [0, positions): cos and sin receive [positions, half] row-major, scaled by
/// `attention_scaling`. As HF's rotary embedding: the angle is the float product p * inv_freq[i]
/// (rounded to float); its cosine and sine are then exact to float rounding.
inline void rope_table(const float* inv_freq, std::size_t half, std::size_t positions, double attention_scaling,
                       float* cos, float* sin) {
  for (std::size_t p = 0; p < positions; ++p)
    for (std::size_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p) * inv_freq[i];
      cos[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle))) * static_cast<float>(attention_scaling);
      sin[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle))) * static_cast<float>(attention_scaling);
    }
}

/// Rotary position embedding in place (HF's rotate_half convention: dimension i of the first
/// half pairs with i + head_dim / 2). x is [tokens, heads * head_dim]; token t has position
/// positions[t], whose row of the tables (rope_table, head_dim / 2 wide) it reads.
/// out_i = x_i cos_i - x_{i+h} sin_i, out_{i+h} = x_{i+h} cos_i + x_i sin_i, each product
/// rounded to T as torch's elementwise float ops round them.
template <class T>
void apply_rope(RowMatrix<T>& x, std::size_t heads, std::size_t head_dim, const std::int32_t* positions,
                const float* cos, const float* sin) {
  const std::size_t half = head_dim / 2;
  const std::size_t width = heads * head_dim;
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const float* c = cos + static_cast<std::size_t>(positions[t]) * half;
    const float* s = sin + static_cast<std::size_t>(positions[t]) * half;
    T* row = x.data() + static_cast<std::size_t>(t) * width;
    for (std::size_t h = 0; h < heads; ++h) {
      T* v = row + h * head_dim;
      for (std::size_t i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half];
        const T ci = static_cast<T>(c[i]), si = static_cast<T>(s[i]);
        const T a_cos = a * ci, b_sin = b * si, b_cos = b * ci, a_sin = a * si;
        v[i] = a_cos - b_sin;
        v[i + half] = b_cos + a_sin;
      }
    }
  }
}

/// SwiGLU in place: gate <- silu(gate) * up, silu(x) = x / (1 + e^-x) (evaluated in double,
/// rounded to T, then multiplied by up in T as HF's act_fn(gate) * up does).
template <class T>
void swiglu(RowMatrix<T>& gate, const RowMatrix<T>& up) {
  T* g = gate.data();
  const T* u = up.data();
  const Eigen::Index n = gate.size();
  for (Eigen::Index i = 0; i < n; ++i) {
    const double x = static_cast<double>(g[i]);
    const T activated = static_cast<T>(x / (1.0 + std::exp(-x)));
    g[i] = activated * u[i];
  }
}

/// Causal self-attention with grouped-query heads over `batch` sequences of `seq` tokens.
/// q, context: [batch * seq, heads * head_dim]; k, v: [batch * seq, kv_heads * head_dim];
/// query head h reads key/value head h / (heads / kv_heads) (HF's repeat_kv). Query i of a
/// sequence attends to keys j <= i with key_mask[b * seq + j] != 0 and, when `window` > 0,
/// i - j < window (Mistral's sliding window). Scores are scaled by `scale`.
///
/// A query with no visible key attends uniformly to all `seq` keys, as transformers' eager
/// attention does (every score of such a row is the dtype's minimum): see causal_attention.
template <class T>
void grouped_causal_attention(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v,
                              std::size_t batch, std::size_t seq, std::size_t heads, std::size_t kv_heads,
                              std::size_t head_dim, const std::uint8_t* key_mask, std::size_t window,
                              double scale, RowMatrix<T>& scores, RowMatrix<T>& context) {
  const Eigen::Index s = static_cast<Eigen::Index>(seq);
  const Eigen::Index d = static_cast<Eigen::Index>(head_dim);
  const std::size_t group = heads / kv_heads;
  const T scale_t = static_cast<T>(scale);
  context.resize(q.rows(), static_cast<Eigen::Index>(heads * head_dim));
  scores.resize(s, s);
  for (std::size_t b = 0; b < batch; ++b) {
    const Eigen::Index row0 = static_cast<Eigen::Index>(b) * s;
    const std::uint8_t* visible = key_mask + b * seq;
    for (std::size_t h = 0; h < heads; ++h) {
      const Eigen::Index q_col = static_cast<Eigen::Index>(h) * d;
      const Eigen::Index kv_col = static_cast<Eigen::Index>(h / group) * d;
      scores.noalias() = q.block(row0, q_col, s, d) * k.block(row0, kv_col, s, d).transpose();
      for (Eigen::Index i = 0; i < s; ++i) {
        T* row = scores.data() + i * s;
        const Eigen::Index first =
            window > 0 && i >= static_cast<Eigen::Index>(window) ? i - static_cast<Eigen::Index>(window) + 1 : 0;
        T max_score = -std::numeric_limits<T>::infinity();
        for (Eigen::Index j = first; j <= i; ++j)
          if (visible[j]) max_score = std::max(max_score, row[j] * scale_t);
        if (max_score == -std::numeric_limits<T>::infinity()) {  // nothing visible
          std::fill(row, row + s, static_cast<T>(1.0 / static_cast<double>(s)));
          continue;
        }
        double sum = 0;
        std::fill(row, row + first, T(0));
        for (Eigen::Index j = first; j <= i; ++j) {
          const T p = visible[j] ? static_cast<T>(std::exp(row[j] * scale_t - max_score)) : T(0);
          row[j] = p;
          sum += static_cast<double>(p);
        }
        const T inv = static_cast<T>(1.0 / sum);
        for (Eigen::Index j = first; j <= i; ++j) row[j] *= inv;
        std::fill(row + i + 1, row + s, T(0));
      }
      context.block(row0, q_col, s, d).noalias() = scores * v.block(row0, kv_col, s, d);
    }
  }
}

}  // namespace zo2::cpu::kernels
