// The int8 row-scaled kernel (offload/row_kernel.cuh) against a host reference written here
// from codecs.hpp and core's Philox / update formulas, on random rows: the updated codes and
// scales, theta + eps z and theta - eps z, the perturb-only and convert passes. Row shapes cover
// quads that straddle rows (row length 70), rows of whole octets (24, 4096, 16392: the kernel's
// vector path, which runs its tensors longest first) and a rank-1 tensor. A large update
// takes the exact absmax sweep and rescales rows; a MeZO-sized one is proved sticky on every row
// (Int8RowCodec::keeps_scale) and must give the same bits as the reference's exact sweep.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/host_offload.cuh>

using namespace zo2;
using namespace zo2::gpu;
using offload::Int8RowCodec;

namespace {

const bool kHaveDevice = [] {
  const bool ok = device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_row_kernel)\n");
  return ok;
}();

struct Fixture {
  ParamLayout layout;
  offload::GroupCodec<Int8RowCodec> codec;
  std::vector<unsigned char> block;  // encoded group: codes, then scales
  offload_detail::RowTable table;
  static constexpr std::uint32_t kFirstId = 40;
  static constexpr std::uint64_t kSeed = 0x5eed1234abcdull;

  Fixture() {
    layout.add("straddling", {37, 70});
    layout.add("long_rows", {9, 4096});
    layout.add("bias", {53}, false);
    layout.add("short_aligned_rows", {11, 24});  // 3 octets a row: most threads idle
    layout.add("wide_rows", {3, 16392});         // 2049 octets a row: threads take 8 or 9
    // a row of zeros (scale 0) and rows with zeros in them: where StochasticRowEncoder declines
    // and the kernel takes code() and value()
    layout.add("zeros", {3, 40});
    codec = offload::GroupCodec<Int8RowCodec>(layout);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 0.05f);
    std::vector<float> flat(layout.total_elements(), 0.0f);
    for (std::size_t r = 0; r < layout.num_tensors(); ++r)
      for (std::size_t j = 0; j < layout.spec(r).numel(); ++j) {
        const bool zero = layout.spec(r).name == "zeros" && (j < 40 || j % 3 == 0);
        flat[layout.offset(r) + j] = zero ? 0.0f : normal(rng) * (1.0f + r);
      }
    block.resize(codec.bytes());
    codec.encode_group(flat, block);
    table = offload_detail::RowTable(codec, layout);
  }

  offload_detail::RowArgs args(bool update, bool perturb, bool convert, double eps, double lr = 0.0) const {
    offload_detail::RowArgs a{};
    a.first_tensor_id = kFirstId;
    a.seed = kSeed;
    a.step = 12;
    a.update_step = 11;
    a.has_update = update;
    a.perturb = perturb;
    a.convert = convert;
    a.eps = eps;
    a.lr = lr;
    a.g = 7.5;
    a.wd = 0.1;
    return a;
  }

  struct Result {
    std::vector<unsigned char> block;
    std::vector<bfloat16> plus, minus;
  };

  Result run(const offload_detail::RowArgs& a, bool with_minus) const {
    DeviceBuffer<unsigned char> d_block(block.size());
    const std::size_t n = layout.total_elements();
    DeviceBuffer<bfloat16> d_plus(n), d_minus(n);
    copy_to_device(d_block.data(), block.data(), block.size(), nullptr);
    ZO2_CUDA_CHECK(cudaMemset(d_plus.data(), 0xff, n * sizeof(bfloat16)));  // poison
    ZO2_CUDA_CHECK(cudaMemset(d_minus.data(), 0xff, n * sizeof(bfloat16)));
    float* scales = reinterpret_cast<float*>(d_block.data() + codec.scales_offset());
    offload_detail::launch_row_kernel<Int8RowCodec, bfloat16>(
        d_block.data(), scales, d_plus.data(), with_minus ? d_minus.data() : nullptr,
        table, a, nullptr);
    ZO2_CUDA_CHECK(cudaDeviceSynchronize());
    Result r{std::vector<unsigned char>(block.size()), std::vector<bfloat16>(n), std::vector<bfloat16>(n)};
    copy_to_host(r.block.data(), d_block.data(), block.size(), nullptr);
    copy_to_host(r.plus.data(), d_plus.data(), n, nullptr);
    copy_to_host(r.minus.data(), d_minus.data(), n, nullptr);
    ZO2_CUDA_CHECK(cudaDeviceSynchronize());
    return r;
  }

  const float* scales_of(const std::vector<unsigned char>& b) const {
    return reinterpret_cast<const float*>(b.data() + codec.scales_offset());
  }
};

// theta + c z in bf16 from the host's z: the kernel's value is within one bf16 step of it (its
// z differs from the host's by fast Box-Muller's ~1e-6 relative, which can move a rounding).
void check_perturbed(const Fixture& f, const std::vector<unsigned char>& block, const std::vector<bfloat16>& out,
                     std::uint32_t step, double c) {
  std::size_t checked = 0, exact = 0;
  for (std::size_t r = 0; r < f.codec.num_tensors(); ++r) {
    const auto& t = f.codec.tensor(r);
    for (std::size_t row = 0; row < t.rows; ++row) {
      const float scale = f.scales_of(block)[t.first_row + row];
      for (std::size_t k = 0; k < t.row_len; ++k) {
        const std::size_t j = row * t.row_len + k;
        const float theta = Int8RowCodec::load(block.data() + t.offset, j, scale);
        const float z = normal_at(Fixture::kSeed, step, Fixture::kFirstId + static_cast<std::uint32_t>(r), j);
        const float want = perturbed_value<float>(theta, z, c);
        const float got = to_float(out[t.offset + j]);
        REQUIRE(std::fabs(got - want) <= std::fabs(want) * (1.0f / 128) + 1e-30f);
        exact += to_bfloat16(want).bits == out[t.offset + j].bits;
        ++checked;
      }
    }
  }
  CHECK(checked == 37 * 70 + 9 * 4096 + 53 + 11 * 24 + 3 * 16392 + 3 * 40);  // every element, no padding
  CHECK(exact >= checked * 999 / 1000);
}

// Runs the fused pass with learning rate lr and checks it against the host reference: decode,
// update with z of update_step, rescale from the exact absmax, encode with the same SR words.
// Codes may differ by one where fast Box-Muller moves a value across an SR threshold (~1e-6
// relative): allowed in at most 0.1% of the elements. Returns the rows whose scale changed,
// leaving out the row of zeros (scale 0, which no proof keeps and any update replaces).
std::size_t check_update(const Fixture& f, double lr) {
  const double eps = 1e-3;
  const auto a = f.args(true, true, false, eps, lr);
  const Fixture::Result got = f.run(a, true);
  std::size_t codes = 0, code_off_by_one = 0, rescaled = 0, provably_kept = 0, rows = 0, zero_rows = 0;
  for (std::size_t r = 0; r < f.codec.num_tensors(); ++r) {
    const auto& t = f.codec.tensor(r);
    const std::uint32_t id = Fixture::kFirstId + static_cast<std::uint32_t>(r);
    const UpdateCoeffs u{a.lr, a.g, f.layout.spec(r).weight_decay ? a.wd : 0.0};
    for (std::size_t row = 0; row < t.rows; ++row, ++rows) {
      const float old_scale = f.scales_of(f.block)[t.first_row + row];
      std::vector<float> updated(t.row_len);
      float absmax = 0.0f, largest = 0.0f;
      for (std::size_t k = 0; k < t.row_len; ++k) {
        const std::size_t j = row * t.row_len + k;
        const float theta = Int8RowCodec::load(f.block.data() + t.offset, j, old_scale);
        largest = std::fmax(largest, std::fabs(theta));
        updated[k] = updated_value<float>(theta, normal_at(Fixture::kSeed, a.update_step, id, j), u);
        absmax = std::fmax(absmax, std::fabs(updated[k]));
      }
      const float want_scale = Int8RowCodec::rescale(old_scale, absmax);
      const float got_scale = f.scales_of(got.block)[t.first_row + row];
      provably_kept += Int8RowCodec::keeps_scale(old_scale, largest, u);
      zero_rows += old_scale == 0.0f;
      // the exact sweep's absmax differs from the host's only by fast Box-Muller's error
      REQUIRE(std::fabs(got_scale - want_scale) <= 1e-5f * want_scale);
      rescaled += got_scale != old_scale && old_scale != 0.0f;
      for (std::size_t k = 0; k < t.row_len; ++k) {
        const std::size_t j = row * t.row_len + k;
        const std::uint32_t bits = rounding_bits_at(Fixture::kSeed, a.update_step, id, j);
        const int want = Int8RowCodec::code(updated[k], got_scale, bits, true);
        const int code = static_cast<std::int8_t>(got.block[t.offset + j]);
        REQUIRE(std::abs(code - want) <= 1);
        code_off_by_one += code != want;
        ++codes;
      }
    }
  }
  MESSAGE("lr " << lr << ": " << codes << " codes, " << code_off_by_one << " off by one; " << rows << " rows, "
                << provably_kept << " provably keep their scale, " << rescaled << " rescaled");
  CHECK(code_off_by_one <= codes / 1000);
  CHECK(zero_rows == 1);
  if (lr < 1e-5) CHECK(provably_kept == rows - zero_rows);  // MeZO-sized: the proof holds on every other row
  check_perturbed(f, got.block, got.plus, a.step, eps);
  check_perturbed(f, got.block, got.minus, a.step, -eps);
  return rescaled;
}

}  // namespace

TEST_CASE("row kernel: update + perturb matches the host reference, sticky and rescaled rows") {
  if (!kHaveDevice) return;
  Fixture f;
  CHECK(check_update(f, 1e-6) == 0);  // every row provably keeps its scale
  CHECK(check_update(f, 2e-3) > 0);   // large enough that rows outgrow their scale: the exact sweep
  // nothing moves: zeros stay zero and the row of zeros keeps scale 0, where the vector path's
  // StochasticRowEncoder declines and code() and value() encode
  CHECK(check_update(f, 0.0) == 0);
}

TEST_CASE("row kernel: perturb only, and convert, leave the codes and scales alone") {
  if (!kHaveDevice) return;
  Fixture f;
  const Fixture::Result minus_only = f.run(f.args(false, true, false, -1e-3), false);
  CHECK(minus_only.block == f.block);
  check_perturbed(f, f.block, minus_only.plus, 12, -1e-3);

  const Fixture::Result converted = f.run(f.args(false, false, true, 0.0), false);
  CHECK(converted.block == f.block);
  for (std::size_t r = 0; r < f.codec.num_tensors(); ++r) {
    const auto& t = f.codec.tensor(r);
    for (std::size_t j = 0; j < t.numel; ++j) {
      const float theta = Int8RowCodec::load(f.block.data() + t.offset, j, f.scales_of(f.block)[t.first_row + j / t.row_len]);
      REQUIRE(converted.plus[t.offset + j].bits == to_bfloat16(theta).bits);
    }
  }
}

namespace {

/// The ZO optimizer family through row_kernel<Int8RowCodec, bfloat16, Rule, true>, against the
/// host reference: d = sum_i c_i z_i (host z), Rule::apply with the element's state, the scale
/// from the exact absmax (the kernel proves it for stateless rules or sweeps), SR encode. Codes
/// may differ by one where fast Box-Muller moves a value across an SR threshold (at most 0.1%);
/// the state must match to float rounding of that z difference; padding state stays untouched.
/// Returns the rows whose scale changed.
template <class Rule>
std::size_t check_family_update(const Fixture& f, double lr, const std::vector<double>& coeffs, bool expect_proof) {
  const double eps = 1e-3;
  PendingUpdate p{11, coeffs[0], lr, 0.1};
  p.rule = Rule::id;
  p.num_queries = static_cast<std::uint32_t>(coeffs.size());
  for (std::size_t i = 1; i < coeffs.size(); ++i) p.set_coeff(static_cast<std::uint32_t>(i), coeffs[i]);
  p.momentum = 0.85;
  p.beta1 = 0.9;
  p.beta2 = 0.999;
  p.adam_eps = 1e-8;
  p.step_size = lr / (1 - 0.9 * 0.9 * 0.9);
  p.inv_sqrt_bc2 = 1 / std::sqrt(1 - 0.999 * 0.999 * 0.999);

  const std::size_t n = f.layout.total_elements();
  const unsigned slots = Rule::kStateSlots;
  // Some state already there (m, v >= 0), and a sentinel in the padding.
  std::vector<float> state(std::size_t{slots} * n, -7.0f);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (unsigned s = 0; s < slots; ++s)
    for (std::size_t r = 0; r < f.layout.num_tensors(); ++r)
      for (std::size_t j = 0; j < f.layout.spec(r).numel(); ++j) {
        const float v = normal(rng);
        state[s * n + f.layout.offset(r) + j] = s == 1 ? v * v : v;
      }

  DeviceBuffer<unsigned char> d_block(f.block.size());
  DeviceBuffer<bfloat16> d_plus(n), d_minus(n);
  DeviceBuffer<float> d_state(state.empty() ? 1 : state.size());
  copy_to_device(d_block.data(), f.block.data(), f.block.size(), nullptr);
  ZO2_CUDA_CHECK(cudaMemset(d_plus.data(), 0xff, n * sizeof(bfloat16)));  // poison
  ZO2_CUDA_CHECK(cudaMemset(d_minus.data(), 0xff, n * sizeof(bfloat16)));
  if (!state.empty()) copy_to_device(d_state.data(), state.data(), state.size(), nullptr);
  offload_detail::RowArgs a = f.args(true, true, false, eps);
  offload_detail::set_plain_update(a, p);
  offload_detail::RowFamilyArgs fam{};
  fam.query = 2;  // the perturbation draws the third query's z
  fam.terms = offload_detail::update_terms(p, slots ? d_state.data() : nullptr, n);
  float* scales = reinterpret_cast<float*>(d_block.data() + f.codec.scales_offset());
  offload_detail::launch_row_kernel<Int8RowCodec, bfloat16, Rule, true>(d_block.data(), scales, d_plus.data(),
                                                                         d_minus.data(), f.table, a, nullptr, fam);
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<unsigned char> got_block(f.block.size());
  std::vector<bfloat16> plus(n), minus(n);
  std::vector<float> got_state(state.size());
  copy_to_host(got_block.data(), d_block.data(), f.block.size(), nullptr);
  copy_to_host(plus.data(), d_plus.data(), n, nullptr);
  copy_to_host(minus.data(), d_minus.data(), n, nullptr);
  if (!state.empty()) copy_to_host(got_state.data(), d_state.data(), state.size(), nullptr);
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());

  std::size_t codes = 0, off_by_one = 0, rescaled = 0, proved = 0, rows = 0, zero_rows = 0, state_bad = 0;
  std::vector<float> want_state = state;
  double coeff_abs_sum = 0;
  for (std::uint32_t i = 0; i < p.num_queries; ++i) coeff_abs_sum += std::fabs(static_cast<float>(p.coeff(i)));
  for (std::size_t r = 0; r < f.codec.num_tensors(); ++r) {
    const auto& t = f.codec.tensor(r);
    const std::uint32_t id = Fixture::kFirstId + static_cast<std::uint32_t>(r);
    const bool decays = f.layout.spec(r).weight_decay;
    const RuleCoeffs rc = p.rule_coeffs(decays);
    for (std::size_t row = 0; row < t.rows; ++row, ++rows) {
      const float old_scale = f.scales_of(f.block)[t.first_row + row];
      std::vector<float> updated(t.row_len);
      float absmax = 0.0f, largest = 0.0f;
      for (std::size_t k = 0; k < t.row_len; ++k) {
        const std::size_t j = row * t.row_len + k;
        const float theta = Int8RowCodec::load(f.block.data() + t.offset, j, old_scale);
        largest = std::fmax(largest, std::fabs(theta));
        float d = 0.0f;
        for (std::uint32_t i = 0; i < p.num_queries; ++i) {
          const float term = static_cast<float>(p.coeff(i)) * normal_at(Fixture::kSeed, p.step, id, j, i);
          d = i == 0 ? term : d + term;
        }
        float s[2] = {};
        for (unsigned sl = 0; sl < slots; ++sl) s[sl] = want_state[sl * n + t.offset + j];
        updated[k] = Rule::apply(theta, d, rc, s);
        for (unsigned sl = 0; sl < slots; ++sl) want_state[sl * n + t.offset + j] = s[sl];
        absmax = std::fmax(absmax, std::fabs(updated[k]));
      }
      if (slots == 0)
        proved += Int8RowCodec::keeps_scale(old_scale, largest, UpdateCoeffs{lr, coeff_abs_sum, decays ? 0.1 : 0.0});
      const float want_scale = Int8RowCodec::rescale(old_scale, absmax);
      const float got_scale = f.scales_of(got_block)[t.first_row + row];
      REQUIRE(std::fabs(got_scale - want_scale) <= 1e-5f * want_scale);
      rescaled += got_scale != old_scale && old_scale != 0.0f;  // as check_update counts
      zero_rows += old_scale == 0.0f;
      for (std::size_t k = 0; k < t.row_len; ++k) {
        const std::size_t j = row * t.row_len + k;
        const std::uint32_t bits = rounding_bits_at(Fixture::kSeed, p.step, id, j);
        const int want = Int8RowCodec::code(updated[k], got_scale, bits, true);
        const int code = static_cast<std::int8_t>(got_block[t.offset + j]);
        REQUIRE(std::abs(code - want) <= 1);
        off_by_one += code != want;
        ++codes;
      }
    }
  }
  // The state differs from the reference by the noise's difference (fast Box-Muller, ~1e-6 of
  // z), which a sum like m = b1 m + (1 - b1) e can leave on a value near zero: compared relative
  // to its own size plus a floor of 1e-3 of the slot's largest value.
  for (unsigned sl = 0; sl < slots; ++sl) {
    float largest = 0.0f;
    for (std::size_t j = 0; j < n; ++j)
      if (want_state[sl * n + j] != -7.0f) largest = std::fmax(largest, std::fabs(want_state[sl * n + j]));
    for (std::size_t j = 0; j < n; ++j) {
      const float w = want_state[sl * n + j], g = got_state[sl * n + j];
      if (w == -7.0f) {
        REQUIRE(g == -7.0f);  // padding: untouched
        continue;
      }
      if (!(std::fabs(g - w) <= 1e-4f * std::fabs(w) + 1e-3f * largest)) ++state_bad;
    }
  }
  MESSAGE("rule " << static_cast<int>(Rule::id) << ", " << coeffs.size() << " queries, lr " << lr << ": " << codes
                  << " codes, " << off_by_one << " off by one; " << rows << " rows, " << proved
                  << " provably keep their scale, " << rescaled << " rescaled; state values off: " << state_bad);
  CHECK(off_by_one <= codes / 1000);
  CHECK(state_bad == 0);
  if (expect_proof) CHECK(proved == rows - zero_rows);
  // theta +- eps z of the third query, from the updated codes
  for (std::size_t r = 0; r < f.codec.num_tensors(); ++r) {
    const auto& t = f.codec.tensor(r);
    for (std::size_t j = 0; j < t.numel; ++j) {
      const float theta = Int8RowCodec::load(got_block.data() + t.offset, j,
                                             f.scales_of(got_block)[t.first_row + j / t.row_len]);
      const float z = normal_at(Fixture::kSeed, 12, Fixture::kFirstId + static_cast<std::uint32_t>(r), j, 2);
      const float wp = perturbed_value<float>(theta, z, eps), wm = perturbed_value<float>(theta, z, -eps);
      REQUIRE(std::fabs(to_float(plus[t.offset + j]) - wp) <= std::fabs(wp) * (1.0f / 128) + 1e-30f);
      REQUIRE(std::fabs(to_float(minus[t.offset + j]) - wm) <= std::fabs(wm) * (1.0f / 128) + 1e-30f);
    }
  }
  return rescaled;
}

}  // namespace

TEST_CASE("row kernel: several queries and stateful rules match the host reference") {
  if (!kHaveDevice) return;
  Fixture f;
  // q = 3, MeZO-sized: sum |c_i| bounds the update, every row provably keeps its scale.
  CHECK(check_family_update<SgdRule>(f, 1e-6, {7.5, -3.0, 1.25}, true) == 0);
  // q = 3, large: rows outgrow their scale and take the exact sweep.
  CHECK(check_family_update<SgdRule>(f, 2e-3, {7.5, -3.0, 1.25}, false) > 0);
  // Stateful rules always sweep; small and large steps.
  check_family_update<MomentumRule>(f, 1e-6, {7.5}, false);
  CHECK(check_family_update<MomentumRule>(f, 2e-3, {7.5, 2.0}, false) > 0);
  check_family_update<AdamRule>(f, 1e-5, {7.5, -1.0}, false);
  CHECK(check_family_update<AdamRule>(f, 5e-3, {7.5}, false) > 0);
}

TEST_CASE("row kernel: the family's instantiation with one query and SGD gives the default's bits") {
  if (!kHaveDevice) return;
  Fixture f;
  for (double lr : {1e-6, 2e-3}) {
    CAPTURE(lr);
    const auto a = f.args(true, true, false, 1e-3, lr);
    const Fixture::Result plain = f.run(a, true);
    DeviceBuffer<unsigned char> d_block(f.block.size());
    const std::size_t n = f.layout.total_elements();
    DeviceBuffer<bfloat16> d_plus(n), d_minus(n);
    copy_to_device(d_block.data(), f.block.data(), f.block.size(), nullptr);
    ZO2_CUDA_CHECK(cudaMemset(d_plus.data(), 0xff, n * sizeof(bfloat16)));  // poisoned as Fixture::run does
    ZO2_CUDA_CHECK(cudaMemset(d_minus.data(), 0xff, n * sizeof(bfloat16)));
    PendingUpdate p{a.update_step, a.g, a.lr, a.wd};
    offload_detail::RowFamilyArgs fam{};
    fam.terms = offload_detail::update_terms(p, nullptr, n);
    float* scales = reinterpret_cast<float*>(d_block.data() + f.codec.scales_offset());
    offload_detail::launch_row_kernel<Int8RowCodec, bfloat16, SgdRule, true>(d_block.data(), scales, d_plus.data(),
                                                                              d_minus.data(), f.table, a, nullptr, fam);
    ZO2_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<unsigned char> block(f.block.size());
    std::vector<bfloat16> plus(n), minus(n);
    copy_to_host(block.data(), d_block.data(), block.size(), nullptr);
    copy_to_host(plus.data(), d_plus.data(), n, nullptr);
    copy_to_host(minus.data(), d_minus.data(), n, nullptr);
    ZO2_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(block == plain.block);
    std::size_t differ = 0;
    for (std::size_t j = 0; j < n; ++j) differ += plus[j].bits != plain.plus[j].bits || minus[j].bits != plain.minus[j].bits;
    CHECK(differ == 0);
  }
}
