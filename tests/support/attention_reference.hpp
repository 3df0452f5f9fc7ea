// The float64 reference of causal multi-head attention with a key mask, as Hugging Face's eager
// OPT attention computes it: rows that see no key attend evenly to every key of the sequence.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace zo2_test {

/// HF eager attention in float64: causal + key mask, flat rows where nothing is visible.
inline std::vector<double> attention_reference(const std::vector<double>& q, const std::vector<double>& k,
                                        const std::vector<double>& v, const std::vector<std::uint8_t>& mask,
                                        std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t hd) {
  const std::int64_t hidden = heads * hd;
  std::vector<double> out(batch * seq * hidden, 0.0), p(seq);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < seq; ++i) {
        double mx = -INFINITY;
        for (std::int64_t j = 0; j <= i; ++j) {
          if (!mask[b * seq + j]) continue;
          double s = 0;
          for (std::int64_t d = 0; d < hd; ++d) s += q[(b * seq + i) * hidden + h * hd + d] * k[(b * seq + j) * hidden + h * hd + d];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        if (mx == -INFINITY) {
          for (std::int64_t j = 0; j < seq; ++j) p[j] = 1.0 / seq;
        } else {
          double sum = 0;
          for (std::int64_t j = 0; j < seq; ++j) {
            p[j] = (j <= i && mask[b * seq + j]) ? std::exp(p[j] - mx) : 0.0;
            sum += p[j];
          }
          for (std::int64_t j = 0; j < seq; ++j) p[j] /= sum;
        }
        for (std::int64_t d = 0; d < hd; ++d) {
          double s = 0;
          for (std::int64_t j = 0; j < seq; ++j) s += p[j] * v[(b * seq + j) * hidden + h * hd + d];
          out[(b * seq + i) * hidden + h * hd + d] = s;
        }
      }
  return out;
}

}  // namespace zo2_test
