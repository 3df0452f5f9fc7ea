// zo2/core/config.hpp -- the optimizer's configuration, validated with messages naming the field.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <functional>

#include <zo2/core/error.hpp>

namespace zo2 {

struct ZOConfig {
  /// Learning rate eta (the base value; see lr_schedule).
  double lr = 1e-6;
  /// Perturbation scale epsilon.
  double eps = 1e-3;
  /// Weight decay lambda, applied as in MeZO: theta -= eta*lambda*theta,
  /// only to tensors whose TensorSpec::weight_decay is true.
  double weight_decay = 0.0;
  /// Seed of the counter-based generator; with (theta, step) it determines the whole run.
  std::uint64_t seed = 0;
  /// Optional schedule: learning rate for step t given the base lr. Empty: constant lr.
  std::function<double(std::uint64_t step, double base_lr)> lr_schedule;

  double lr_at(std::uint64_t step) const { return lr_schedule ? lr_schedule(step, lr) : lr; }

  void validate() const {
    if (!std::isfinite(lr) || lr < 0) throw ConfigError("lr", "must be finite and >= 0");
    if (!std::isfinite(eps) || eps <= 0) throw ConfigError("eps", "must be finite and > 0");
    if (!std::isfinite(weight_decay) || weight_decay < 0)
      throw ConfigError("weight_decay", "must be finite and >= 0");
  }
};

/// Linear warm-up then cosine decay to min_ratio * lr over total_steps; a ready schedule.
inline std::function<double(std::uint64_t, double)> cosine_schedule(std::uint64_t warmup_steps,
                                                                    std::uint64_t total_steps,
                                                                    double min_ratio = 0.0) {
  if (total_steps == 0) throw ConfigError("total_steps", "must be > 0 for a cosine schedule");
  return [=](std::uint64_t t, double lr) {
    if (t < warmup_steps) return lr * static_cast<double>(t + 1) / static_cast<double>(warmup_steps);
    const double progress =
        std::min(1.0, static_cast<double>(t - warmup_steps) /
                          static_cast<double>(std::max<std::uint64_t>(1, total_steps - warmup_steps)));
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress)));
  };
}

}  // namespace zo2
