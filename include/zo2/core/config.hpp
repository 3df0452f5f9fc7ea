// zo2/core/config.hpp -- the optimizer's configuration, validated with messages naming the field.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <functional>
#include <string>
#include <string_view>

#include <zo2/core/error.hpp>

namespace zo2 {

/// The ZO optimizer family (ZO-Bench's definitions; optim/zo_optimizer.hpp applies them).
enum class ZOMethod {
  kSgd,           // "zo-sgd": MeZO-SGD, theta <- theta - lr (g z + lambda theta)
  kSign,          // "zo-sign": the same with sign(g) for g
  kMomentum,      // "zo-mmt": heavy-ball momentum on g z
  kAdam,          // "zo-adam": Adam on g z
  kConservative,  // "zo-cons": keep the best of theta, theta - lr g z, theta + lr g z
};

/// How the projected gradient is estimated.
enum class ZOEstimator {
  kTwoSide,  // g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)
  kOneSide,  // g = (L(theta + eps z) - L(theta)) / eps
};

inline const char* method_name(ZOMethod m) {
  switch (m) {
    case ZOMethod::kSgd: return "zo-sgd";
    case ZOMethod::kSign: return "zo-sign";
    case ZOMethod::kMomentum: return "zo-mmt";
    case ZOMethod::kAdam: return "zo-adam";
    case ZOMethod::kConservative: return "zo-cons";
  }
  return "?";
}
/// Parses "zo-sgd", "zo-sign", "zo-mmt", "zo-cons", "zo-adam" (ConfigError naming `field` else).
inline ZOMethod parse_method(std::string_view s, const char* field = "optimizer") {
  for (ZOMethod m : {ZOMethod::kSgd, ZOMethod::kSign, ZOMethod::kMomentum, ZOMethod::kAdam, ZOMethod::kConservative})
    if (s == method_name(m)) return m;
  throw ConfigError(field, "unknown optimizer '" + std::string(s) + "' (zo-sgd, zo-sign, zo-mmt, zo-cons, zo-adam)");
}
inline const char* estimator_name(ZOEstimator e) { return e == ZOEstimator::kTwoSide ? "two-side" : "one-side"; }
inline ZOEstimator parse_estimator(std::string_view s, const char* field = "estimator") {
  if (s == "two-side") return ZOEstimator::kTwoSide;
  if (s == "one-side") return ZOEstimator::kOneSide;
  throw ConfigError(field, "unknown estimator '" + std::string(s) + "' (two-side, one-side)");
}

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

  /// The update rule and the estimator.
  ZOMethod method = ZOMethod::kSgd;
  ZOEstimator estimator = ZOEstimator::kTwoSide;
  /// Independent z per step (q-SPSA): the update follows the mean of the q estimates.
  unsigned queries = 1;
  /// zo-mmt's mu.
  double momentum = 0.9;
  /// zo-adam's betas and eps_hat.
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;

  double lr_at(std::uint64_t step) const { return lr_schedule ? lr_schedule(step, lr) : lr; }

  void validate() const {
    if (!std::isfinite(lr) || lr < 0) throw ConfigError("lr", "must be finite and >= 0");
    if (!std::isfinite(eps) || eps <= 0) throw ConfigError("eps", "must be finite and > 0");
    if (!std::isfinite(weight_decay) || weight_decay < 0)
      throw ConfigError("weight_decay", "must be finite and >= 0");
    if (queries < 1 || queries > 16) throw ConfigError("queries", "must be in [1, 16]");
    if (!std::isfinite(momentum) || momentum < 0 || momentum >= 1)
      throw ConfigError("momentum", "must be in [0, 1)");
    if (!std::isfinite(beta1) || beta1 < 0 || beta1 >= 1) throw ConfigError("beta1", "must be in [0, 1)");
    if (!std::isfinite(beta2) || beta2 < 0 || beta2 >= 1) throw ConfigError("beta2", "must be in [0, 1)");
    if (!std::isfinite(adam_eps) || adam_eps <= 0) throw ConfigError("adam_eps", "must be finite and > 0");
    if (method == ZOMethod::kConservative) {
      if (queries != 1) throw ConfigError("queries", "zo-cons takes one query per step");
      if (weight_decay != 0)
        throw ConfigError("weight_decay", "zo-cons compares losses at theta -+ lr g z and takes no weight decay");
    }
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
