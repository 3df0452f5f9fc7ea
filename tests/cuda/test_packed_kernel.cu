// The packed bf16 pass (offload/packed_kernel.cuh) against the bf16 group kernel
// (backend/cuda/perturb.cuh) on the same weights: the packed format is exact, so after every
// step the decoded weights, and theta + eps z / theta - eps z, must equal the bf16 path's bit for
// bit. Weights are OPT-like with a few chunks of extreme values, so escapes are created, moved and
// dropped by the updates and read back from the GPU-sorted lists the next step.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/packed_bf16.hpp>
#include <zo2/offload/packed_kernel.cuh>

using namespace zo2;
using namespace zo2::gpu;

namespace {

const bool kHaveDevice = [] {
  const bool ok = device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_packed_kernel)\n");
  return ok;
}();

constexpr std::uint32_t kFirstId = 7;
constexpr std::uint64_t kSeed = 0xabcdef0123ull;

ParamLayout test_layout() {
  ParamLayout l;
  l.add("fc.weight", {96, 70});  // its last chunk is partial
  l.add("fc.bias", {96}, false);
  l.add("big.weight", {256, 512});
  l.add("ln.weight", {33}, false);
  return l;
}

}  // namespace

TEST_CASE("packed pass equals the bf16 group pass bit for bit over several steps" * doctest::skip(!kHaveDevice)) {
  const ParamLayout layout = test_layout();
  const offload::PackedBf16Group codec(layout);
  offload_detail::PackedPass pass(codec, layout);
  GroupTable table(layout);
  const std::size_t n = layout.total_elements();
  const Event body_done;
  const Event* split = nullptr;
  SUBCASE("one fused launch") {}
  SUBCASE("split at the body, as HostOffload runs it") { split = &body_done; }

  // Weights: N(0, 0.02), plus one chunk in 512 spanning 40 binades and a few tiny values
  // (escapes). Denser extremes would need more escapes than a tensor's room (0.5% of it).
  std::vector<bfloat16> theta(n, bfloat16{0});
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    for (std::size_t j = 0; j < layout.spec(r).numel(); ++j) {
      float v = normal(rng);
      if (j % 997 == 3) v = std::ldexp(v, -25);  // far below its chunk's largest
      if (j % 16384 < 32 && j % 2 == 0) v = std::ldexp(v, static_cast<int>(rng() % 40) - 20);
      theta[layout.offset(r) + j] = to_bfloat16(v);
    }
  std::vector<unsigned char> packed(codec.bytes(), 0);
  {
    std::vector<float> flat(n);
    for (std::size_t j = 0; j < n; ++j) flat[j] = to_float(theta[j]);
    codec.encode_group(flat, packed);
  }
  std::size_t escapes0 = 0;
  for (std::size_t r = 0; r < layout.num_tensors(); ++r) escapes0 += codec.escape_count(r, packed);
  MESSAGE("escapes at the start: " << escapes0);
  REQUIRE(escapes0 > 0);

  DeviceBuffer<bfloat16> d_theta(n), d_plus_a(n), d_minus_a(n), d_plus_b(n), d_minus_b(n);
  DeviceBuffer<unsigned char> d_packed(packed.size());
  ZO2_CUDA_CHECK(cudaMemcpy(d_theta.data(), theta.data(), n * sizeof(bfloat16), cudaMemcpyHostToDevice));
  ZO2_CUDA_CHECK(cudaMemcpy(d_packed.data(), packed.data(), packed.size(), cudaMemcpyHostToDevice));
  Stream stream;
  for (std::uint32_t step = 1; step <= 4; ++step) {
    CAPTURE(step);
    // A large update (lr * g = 5e-3 against weights of 2e-2), so exponents and escapes move.
    const PendingUpdate pending{step - 1, 0.01, 0.5, 0.1};
    const PendingUpdate* owed = step > 1 ? &pending : nullptr;
    update_and_perturb(d_theta.data(), d_plus_a.data(), d_minus_a.data(), table, kFirstId, kSeed, step, 1e-3, owed,
                       stream.get());
    offload_detail::PackedArgs a{};
    a.first_tensor_id = kFirstId;
    a.seed = kSeed;
    a.step = step;
    a.eps = 1e-3;
    a.perturb = true;
    if (owed) zo2::gpu::detail::set_owed_update(a, *owed);
    pass.run(d_packed.data(), d_plus_b.data(), d_minus_b.data(), a, stream.get(), split);
    stream.synchronize();

    std::vector<bfloat16> want(n), plus_a(n), minus_a(n), plus_b(n), minus_b(n);
    ZO2_CUDA_CHECK(cudaMemcpy(want.data(), d_theta.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(plus_a.data(), d_plus_a.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(minus_a.data(), d_minus_a.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(plus_b.data(), d_plus_b.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(minus_b.data(), d_minus_b.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(packed.data(), d_packed.data(), packed.size(), cudaMemcpyDeviceToHost));
    std::size_t theta_differ = 0, out_differ = 0, escapes = 0;
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      const std::size_t off = layout.offset(r), numel = layout.spec(r).numel();
      std::vector<bfloat16> got(numel);
      codec.decode_bf16(r, packed, got);  // also checks the sorted escape lists
      escapes += codec.escape_count(r, packed);
      for (std::size_t j = 0; j < numel; ++j) {
        theta_differ += got[j].bits != want[off + j].bits;
        out_differ += plus_b[off + j].bits != plus_a[off + j].bits;
        out_differ += minus_b[off + j].bits != minus_a[off + j].bits;
      }
    }
    MESSAGE("step " << step << ": escapes " << escapes);
    CHECK(theta_differ == 0);
    CHECK(out_differ == 0);
  }
  CHECK(pass.overflow(stream.get()) == 0);
}

TEST_CASE("escapes beyond a tensor's room are counted and flushed, nothing else changes" *
          doctest::skip(!kHaveDevice)) {
  // Every 32-element chunk: one 1.0 and 31 values of +-3e-4 (12 binades below, inside the
  // 4-bit code, so the start needs no escapes). An update of ~5e-3 z takes ~2% of the small
  // values below 2^-13 -- escapes, ~600 of them against the tensor's room of 163.
  ParamLayout layout;
  layout.add("w.weight", {128, 256});
  const offload::PackedBf16Group codec(layout);
  offload_detail::PackedPass pass(codec, layout);
  GroupTable table(layout);
  const std::size_t n = layout.total_elements();
  std::vector<bfloat16> theta(n);
  std::mt19937 rng(5);
  for (std::size_t j = 0; j < n; ++j)
    theta[j] = to_bfloat16(j % 32 == 0 ? 1.0f : (rng() & 1 ? 3e-4f : -3e-4f));
  std::vector<unsigned char> packed(codec.bytes(), 0);
  {
    std::vector<float> flat(n);
    for (std::size_t j = 0; j < n; ++j) flat[j] = to_float(theta[j]);
    codec.encode_group(flat, packed);
  }
  REQUIRE(codec.escape_count(0, packed) == 0);
  const std::size_t room = codec.tensor(0).escape_capacity;

  DeviceBuffer<bfloat16> d_theta(n), d_plus(n), d_minus(n);
  DeviceBuffer<unsigned char> d_packed(packed.size());
  ZO2_CUDA_CHECK(cudaMemcpy(d_theta.data(), theta.data(), n * sizeof(bfloat16), cudaMemcpyHostToDevice));
  ZO2_CUDA_CHECK(cudaMemcpy(d_packed.data(), packed.data(), packed.size(), cudaMemcpyHostToDevice));
  Stream stream;
  const PendingUpdate pending{1, 0.5, 0.01, 0.0};
  update_and_perturb(d_theta.data(), d_plus.data(), d_minus.data(), table, kFirstId, kSeed, 2, 1e-3, &pending,
                     stream.get());
  offload_detail::PackedArgs a{};
  a.first_tensor_id = kFirstId;
  a.seed = kSeed;
  a.step = 2;
  a.eps = 1e-3;
  a.perturb = true;
  zo2::gpu::detail::set_owed_update(a, pending);
  pass.run(d_packed.data(), d_plus.data(), d_minus.data(), a, stream.get());
  const std::uint32_t overflow = pass.overflow(stream.get());

  std::vector<bfloat16> want(n), got(n);
  ZO2_CUDA_CHECK(cudaMemcpy(want.data(), d_theta.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
  ZO2_CUDA_CHECK(cudaMemcpy(packed.data(), d_packed.data(), packed.size(), cudaMemcpyDeviceToHost));
  codec.decode_bf16(0, packed, got);
  std::size_t needed = 0, differ = 0, differ_not_flushed = 0;
  const auto exponent = [](bfloat16 v) { return static_cast<unsigned>((v.bits >> 7) & 0xffu); };
  for (std::size_t j = 0; j < n; ++j) {
    unsigned largest = 0;  // the chunk's largest exponent field after the update (1.0 +- 5e-3)
    for (std::size_t k = j / 32 * 32; k < std::min(n, j / 32 * 32 + 32); ++k) largest = std::max(largest, exponent(want[k]));
    needed += exponent(want[j]) != 0 && exponent(want[j]) + 13 < largest;
    if (got[j].bits != want[j].bits) {
      ++differ;
      // Flushed: exponent field 0, sign and mantissa kept (a subnormal below 1.2e-38).
      differ_not_flushed += exponent(got[j]) != 0 || (got[j].bits & 0x807f) != (want[j].bits & 0x807f);
    }
  }
  MESSAGE("escapes needed " << needed << ", room " << room << ", overflow " << overflow);
  REQUIRE(needed > room);
  CHECK(overflow == needed - room);  // the list is filled to its room, the rest are counted
  CHECK(codec.escape_count(0, packed) == room);
  CHECK(differ == overflow);         // exactly the overflowed values differ ...
  CHECK(differ_not_flushed == 0);    // ... and they are flushed
}

namespace {

/// The family's packed pass (packed_kernel<T, Rule, true>) against the bf16 codec's family pass
/// (plain_kernel.cuh) on the same weights and state, over several steps: decoded weights, the
/// rule state, theta + eps z and theta - eps z (of query `query`) bit for bit.
template <class Rule>
void check_packed_family(std::vector<double> coeffs, std::uint32_t query, const Event* split) {
  const ParamLayout layout = test_layout();
  const offload::PackedBf16Group codec(layout);
  offload_detail::PackedPass pass(codec, layout);
  GroupTable table(layout);
  const std::size_t n = layout.total_elements();
  std::vector<bfloat16> theta(n, bfloat16{0});
  std::mt19937 rng(29);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    for (std::size_t j = 0; j < layout.spec(r).numel(); ++j) {
      float v = normal(rng);
      if (j % 997 == 3) v = std::ldexp(v, -25);  // escapes
      theta[layout.offset(r) + j] = to_bfloat16(v);
    }
  std::vector<unsigned char> packed(codec.bytes(), 0);
  {
    std::vector<float> flat(n);
    for (std::size_t j = 0; j < n; ++j) flat[j] = to_float(theta[j]);
    codec.encode_group(flat, packed);
  }
  const unsigned slots = Rule::kStateSlots;
  DeviceBuffer<bfloat16> d_theta(n), d_plus_a(n), d_minus_a(n), d_plus_b(n), d_minus_b(n);
  DeviceBuffer<unsigned char> d_packed(packed.size());
  DeviceBuffer<float> d_state_a(slots ? slots * n : 1), d_state_b(slots ? slots * n : 1);
  ZO2_CUDA_CHECK(cudaMemcpy(d_theta.data(), theta.data(), n * sizeof(bfloat16), cudaMemcpyHostToDevice));
  ZO2_CUDA_CHECK(cudaMemcpy(d_packed.data(), packed.data(), packed.size(), cudaMemcpyHostToDevice));
  ZO2_CUDA_CHECK(cudaMemset(d_state_a.data(), 0, d_state_a.bytes()));
  ZO2_CUDA_CHECK(cudaMemset(d_state_b.data(), 0, d_state_b.bytes()));
  Stream stream;
  for (std::uint32_t step = 1; step <= 4; ++step) {
    CAPTURE(step);
    PendingUpdate pending{step - 1, coeffs[0], 0.5, 0.1};
    pending.rule = Rule::id;
    pending.num_queries = static_cast<std::uint32_t>(coeffs.size());
    for (std::size_t i = 1; i < coeffs.size(); ++i) pending.set_coeff(static_cast<std::uint32_t>(i), coeffs[i] * step);
    pending.momentum = 0.9;
    pending.beta1 = 0.9;
    pending.beta2 = 0.999;
    pending.adam_eps = 1e-8;
    pending.step_size = 5e-3 / (1 - std::pow(0.9, step));
    pending.inv_sqrt_bc2 = 1 / std::sqrt(1 - std::pow(0.999, step));
    const bool owed = step > 1;
    offload_detail::PlainArgs pa{};
    pa.first_tensor_id = kFirstId;
    pa.seed = kSeed;
    pa.step = step;
    pa.query = query;
    pa.eps = 1e-3;
    if (owed) {
      offload_detail::set_plain_update(pa, pending);
      pa.terms = offload_detail::update_terms(pending, slots ? d_state_a.data() : nullptr, n);
    }
    offload_detail::launch_plain_family<Rule, bfloat16, bfloat16>(d_theta.data(), d_plus_a.data(), d_minus_a.data(),
                                                                  table, pa, stream.get());
    offload_detail::PackedArgs a{};
    a.first_tensor_id = kFirstId;
    a.seed = kSeed;
    a.step = step;
    a.query = query;
    a.eps = 1e-3;
    a.perturb = true;
    if (owed) {
      offload_detail::set_plain_update(a, pending);
      a.terms = offload_detail::update_terms(pending, slots ? d_state_b.data() : nullptr, n);
    }
    pass.run<bfloat16, Rule, true>(d_packed.data(), d_plus_b.data(), d_minus_b.data(), a, stream.get(), split);
    stream.synchronize();

    std::vector<bfloat16> want(n), plus_a(n), minus_a(n), plus_b(n), minus_b(n);
    std::vector<float> state_a(slots * n), state_b(slots * n);
    ZO2_CUDA_CHECK(cudaMemcpy(want.data(), d_theta.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(plus_a.data(), d_plus_a.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(minus_a.data(), d_minus_a.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(plus_b.data(), d_plus_b.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(minus_b.data(), d_minus_b.data(), n * sizeof(bfloat16), cudaMemcpyDeviceToHost));
    ZO2_CUDA_CHECK(cudaMemcpy(packed.data(), d_packed.data(), packed.size(), cudaMemcpyDeviceToHost));
    if (slots) {
      ZO2_CUDA_CHECK(cudaMemcpy(state_a.data(), d_state_a.data(), state_a.size() * sizeof(float), cudaMemcpyDeviceToHost));
      ZO2_CUDA_CHECK(cudaMemcpy(state_b.data(), d_state_b.data(), state_b.size() * sizeof(float), cudaMemcpyDeviceToHost));
    }
    std::size_t theta_differ = 0, out_differ = 0, moved = 0;
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      const std::size_t off = layout.offset(r), numel = layout.spec(r).numel();
      std::vector<bfloat16> got(numel);
      codec.decode_bf16(r, packed, got);
      for (std::size_t j = 0; j < numel; ++j) {
        theta_differ += got[j].bits != want[off + j].bits;
        moved += want[off + j].bits != theta[off + j].bits;
        out_differ += plus_b[off + j].bits != plus_a[off + j].bits;
        out_differ += minus_b[off + j].bits != minus_a[off + j].bits;
      }
    }
    CHECK(theta_differ == 0);
    CHECK(out_differ == 0);
    CHECK(std::memcmp(state_a.data(), state_b.data(), state_a.size() * sizeof(float)) == 0);
    if (owed) CHECK(moved > 0);
  }
  CHECK(pass.overflow(stream.get()) == 0);
}

}  // namespace

TEST_CASE("packed family pass equals the bf16 family pass bit for bit: several queries, momentum, Adam" *
          doctest::skip(!kHaveDevice)) {
  const Event body_done;
  const Event* split = nullptr;
  SUBCASE("one fused launch") {}
  SUBCASE("split at the body, as HostOffload runs it") { split = &body_done; }
  check_packed_family<SgdRule>({0.01, -0.004, 0.002}, 0, split);
  check_packed_family<SgdRule>({0.01}, 3, split);  // one query, the perturbation of another
  check_packed_family<MomentumRule>({0.01}, 0, split);
  check_packed_family<MomentumRule>({0.01, 0.003}, 1, split);
  check_packed_family<AdamRule>({0.01, -0.004, 0.002}, 2, split);
}
