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
#include <zo2/core/zo_element.hpp>

namespace zo2::cpu {

template <class S>
struct Perturber {
  using C = compute_t<S>;

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
    for_each_quad(n, id, [&](std::size_t j, float z, std::uint32_t) {
      dst[j] = static_cast<T>(perturbed_value<S>(load(theta[j]), z, c));
    });
  }

  /// theta <- theta - lr * (g * z + wd * theta); 16-bit storage rounds stochastically.
  static void update(S* theta, std::size_t n, NoiseId id, const UpdateCoeffs& u) {
    for_each_quad(n, id, [&](std::size_t j, float z, std::uint32_t bits) {
      theta[j] = store_rounded<S>(updated_value<S>(load(theta[j]), z, u), bits, true);
    });
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
    const std::size_t quads = (n + 3) / 4;
    for (std::size_t q = 0; q < quads; ++q) {
      Normal4 z_now = normal4(now.seed, now.step, now.tensor, q);
      Normal4 z_prev{};
      Philox4x32 bits{};
      if (pending) {
        z_prev = normal4(previous.seed, previous.step, previous.tensor, q);
        bits = philox_words(previous.seed, previous.step, previous.tensor | kRoundingStream, q);
      }
      for (std::size_t k = 0; k < 4 && 4 * q + k < n; ++k) {
        const std::size_t j = 4 * q + k;
        if (pending) theta[j] = store_rounded<S>(updated_value<S>(load(theta[j]), z_prev.z[k], *pending), bits.v[k], true);
        const C t = load(theta[j]);
        plus[j] = static_cast<T>(perturbed_value<S>(t, z_now.z[k], eps));
        if (minus) minus[j] = static_cast<T>(perturbed_value<S>(t, z_now.z[k], -eps));
      }
    }
  }

 private:
  /// Calls f(j, z_j, rounding_word_j) for j in [0, n).
  template <class F>
  static void for_each_quad(std::size_t n, NoiseId id, F&& f) {
    const std::size_t quads = (n + 3) / 4;
    for (std::size_t q = 0; q < quads; ++q) {
      const Normal4 z = normal4(id.seed, id.step, id.tensor, q);
      const Philox4x32 bits = philox_words(id.seed, id.step, id.tensor | kRoundingStream, q);
      for (std::size_t k = 0; k < 4 && 4 * q + k < n; ++k) f(4 * q + k, z.z[k], bits.v[k]);
    }
  }
};

}  // namespace zo2::cpu
