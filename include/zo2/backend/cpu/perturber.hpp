// zo2/backend/cpu/perturber.hpp -- regenerate z and apply MeZO's perturbations and updates on
// the host, for storage precision S (float, double, bfloat16, float16).
//
// z is never stored: each call regenerates it from (seed, step, tensor, element), four elements
// per Philox call. A tensor's first element is at a multiple of kTensorAlignment, so quads never
// straddle tensors and element j of a tensor always draws the same z whatever its group offset.
#pragma once

#include <cstddef>
#include <cstdint>

#include <zo2/core/philox.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2::cpu {

template <class S>
struct Perturber {
  using C = compute_t<S>;
  /// Whether an update's result is rounded stochastically (and so needs rounding bits).
  static constexpr bool kStochastic = is_half_v<S>;

  /// theta += c * z in place. 16-bit storage rounds to nearest here: zo2's own paths never
  /// perturb 16-bit masters in place (they perturb into a scratch copy), and in-place
  /// perturbation of bf16 is lossy by nature (theta + ez - 2ez + ez != theta).
  static void add_scaled_noise(S* theta, std::size_t n, NoiseId id, double c) {
    for_each_quad(n, id, [&](std::size_t j, float z, std::uint32_t) {
      theta[j] = store_rounded<S>(perturbed_value<S>(load(theta[j]), z, c), 0, false);
    });
  }

  /// dst = theta + c * z, computed in compute_t<S> and converted to T (the model's precision).
  template <class T>
  static void add_scaled_noise_into(T* dst, const S* theta, std::size_t n, NoiseId id, double c) {
    for_each_quad(n, id, [&](std::size_t j, float z, std::uint32_t) {  // z of id.query
      dst[j] = static_cast<T>(perturbed_value<S>(load(theta[j]), z, c));
    });
  }

  /// theta <- theta - lr * (g * z + wd * theta); 16-bit storage rounds stochastically.
  static void update(S* theta, std::size_t n, NoiseId id, const UpdateCoeffs& u) {
    const PendingUpdate p{id.step, u.g, u.lr, u.wd};
    apply<SgdRule>(theta, nullptr, 0, n, p, true, id);
  }

  /// The owed update `p` of one tensor with rule Rule: d_j = sum_i c_i z(p.step, query i)_j,
  /// theta_j <- Rule::apply(theta_j, d_j), rounded to S (stochastically for 16-bit S).
  /// `state` holds Rule::kStateSlots arrays of n values, `state_stride` apart; `decays` whether
  /// the tensor takes weight decay; id names the tensor (its step and query are ignored).
  template <class Rule>
  static void apply(S* theta, C* state, std::size_t state_stride, std::size_t n, const PendingUpdate& p,
                    bool decays, NoiseId id) {
    update_and_perturb_into<Rule, S>(theta, nullptr, nullptr, n, &p, decays, state, state_stride, id, id, 0.0);
  }

  /// The fused pass of the lazy update: apply step t-1's update to theta (if `pending`), then
  /// write plus = theta + eps z_t and minus = theta - eps z_t (minus may be null: a caller
  /// that keeps one copy writes it later with add_scaled_noise_into). Bit-identical to update()
  /// followed by two add_scaled_noise_into() calls, since the updated theta is rounded to S before
  /// it is perturbed: a resumed run (which applies the update, saves, then perturbs) matches.
  template <class T>
  static void update_and_perturb_into(S* theta, T* plus, T* minus, std::size_t n,
                                      const UpdateCoeffs* pending, NoiseId previous, NoiseId now,
                                      double eps) {
    if (!pending) {
      update_and_perturb_into<SgdRule, T>(theta, plus, minus, n, nullptr, false, nullptr, 0, previous, now, eps);
      return;
    }
    const PendingUpdate p{previous.step, pending->g, pending->lr, pending->wd};
    update_and_perturb_into<SgdRule, T>(theta, plus, minus, n, &p, true, nullptr, 0, previous, now, eps);
  }

  /// The same for any rule and any number of queries: `pending` (if not null) is applied with
  /// rule Rule (previous names the tensor; the update's step and queries come from `pending`),
  /// then plus = theta + eps z(now) and minus = theta - eps z(now), now.query selecting the z.
  /// plus may be null (an update alone).
  template <class Rule, class T>
  static void update_and_perturb_into(S* theta, T* plus, T* minus, std::size_t n, const PendingUpdate* pending,
                                      bool decays, C* state, std::size_t state_stride, NoiseId previous,
                                      NoiseId now, double eps) {
    const std::size_t quads = (n + 3) / 4;
    const RuleCoeffs coeffs = pending ? pending->rule_coeffs(decays) : RuleCoeffs{};
    const std::uint32_t queries = pending ? pending->num_queries : 0;
    Philox4x32 bits{};  // the rounding words of quads q and q + 1, q even
    for (std::size_t q = 0; q < quads; ++q) {
      C d[4] = {};
      if (pending) {
        for (std::uint32_t i = 0; i < queries; ++i) {
          const Normal4 z = normal4(previous.seed, pending->step, previous.tensor, q, i);
          const C c = static_cast<C>(pending->coeff(i));
          for (int k = 0; k < 4; ++k) {
            const C term = detail::mul_rn(c, static_cast<C>(z.z[k]));
            d[k] = i == 0 ? term : detail::add_rn(d[k], term);
          }
        }
        if (kStochastic && q % 2 == 0) bits = rounding_words(previous.seed, pending->step, previous.tensor, q / 2);
      }
      Normal4 z_now{};
      if (plus) z_now = normal4(now.seed, now.step, now.tensor, q, now.query);
      for (std::size_t k = 0; k < 4 && 4 * q + k < n; ++k) {
        const std::size_t j = 4 * q + k;
        if (pending) {
          C s[Rule::kStateSlots > 0 ? Rule::kStateSlots : 1];
          if constexpr (Rule::kStateSlots > 0)
            for (unsigned r = 0; r < Rule::kStateSlots; ++r) s[r] = state[r * state_stride + j];
          theta[j] = store_rounded<S>(Rule::apply(load(theta[j]), d[k], coeffs, s),
                                      rounding_bits(bits, static_cast<unsigned>(j % 8)), true);
          if constexpr (Rule::kStateSlots > 0)
            for (unsigned r = 0; r < Rule::kStateSlots; ++r) state[r * state_stride + j] = s[r];
        }
        if (!plus) continue;
        const C t = load(theta[j]);
        plus[j] = static_cast<T>(perturbed_value<S>(t, z_now.z[k], eps));
        if (minus) minus[j] = static_cast<T>(perturbed_value<S>(t, z_now.z[k], -eps));
      }
    }
  }

 private:
  /// Calls f(j, z_j, rounding_bits_j) for j in [0, n); the rounding bits only if Rounding
  /// (0 otherwise, and no Philox call spent on them).
  template <bool Rounding = false, class F>
  static void for_each_quad(std::size_t n, NoiseId id, F&& f) {
    const std::size_t quads = (n + 3) / 4;
    Philox4x32 bits{};  // the rounding words of quads q and q + 1, q even
    for (std::size_t q = 0; q < quads; ++q) {
      const Normal4 z = normal4(id.seed, id.step, id.tensor, q, id.query);
      if (Rounding && q % 2 == 0) bits = rounding_words(id.seed, id.step, id.tensor, q / 2);
      for (std::size_t k = 0; k < 4 && 4 * q + k < n; ++k) {
        const std::size_t j = 4 * q + k;
        f(j, z.z[k], Rounding ? rounding_bits(bits, static_cast<unsigned>(j % 8)) : 0u);
      }
    }
  }
};

}  // namespace zo2::cpu
