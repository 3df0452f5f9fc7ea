// The float64 reference of grouped-query causal attention with a key mask and a sliding window,
// as Hugging Face's eager attention computes it for the LLaMA family (repeat_kv, then the causal,
// padding and window masks): query head h reads kv head h / (heads / kv_heads); query i sees
// keys j <= i with mask[j] and, when window > 0, i - j < window; a row that sees no key attends
// evenly to every key of the sequence.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace zo2_test {

/// q [batch * seq, ld_q], k and v [batch * seq, ld_kv] (head h in columns [h hd, (h + 1) hd));
/// returns the context dense: [batch * seq, heads * hd].
inline std::vector<double> grouped_attention_reference(const std::vector<double>& q, const std::vector<double>& k,
                                                       const std::vector<double>& v,
                                                       const std::vector<std::uint8_t>& mask, std::int64_t batch,
                                                       std::int64_t seq, std::int64_t heads, std::int64_t kv_heads,
                                                       std::int64_t hd, std::int64_t window, std::int64_t ld_q,
                                                       std::int64_t ld_kv) {
  const std::int64_t width = heads * hd, group = heads / kv_heads;
  std::vector<double> out(batch * seq * width, 0.0), p(seq);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t kvc = h / group * hd;
      for (std::int64_t i = 0; i < seq; ++i) {
        double mx = -INFINITY;
        std::fill(p.begin(), p.end(), -INFINITY);
        for (std::int64_t j = 0; j <= i; ++j) {
          if (!mask[b * seq + j] || (window > 0 && i - j >= window)) continue;
          double s = 0;
          for (std::int64_t d = 0; d < hd; ++d)
            s += q[(b * seq + i) * ld_q + h * hd + d] * k[(b * seq + j) * ld_kv + kvc + d];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        if (mx == -INFINITY) {
          std::fill(p.begin(), p.end(), 1.0 / static_cast<double>(seq));
        } else {
          double sum = 0;
          for (std::int64_t j = 0; j < seq; ++j) {
            p[j] = p[j] == -INFINITY ? 0.0 : std::exp(p[j] - mx);
            sum += p[j];
          }
          for (std::int64_t j = 0; j < seq; ++j) p[j] /= sum;
        }
        for (std::int64_t d = 0; d < hd; ++d) {
          double s = 0;
          for (std::int64_t j = 0; j < seq; ++j) s += p[j] * v[(b * seq + j) * ld_kv + kvc + d];
          out[(b * seq + i) * width + h * hd + d] = s;
        }
      }
    }
  return out;
}

}  // namespace zo2_test
