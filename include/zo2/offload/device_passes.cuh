// zo2/offload/device_passes.cuh -- each codec's device side behind one interface: the passes
// HostOffload runs over a group's master in device memory (a slot or a resident buffer).
//
// A pass (DevicePass below) is built once per group kind (prologue, block, epilogue) from the
// kind's codec and layout, allocating its tables, and then runs, asynchronously on a stream,
//   kPerturb      the owed update (if any), then theta + eps z into plus (and theta - eps z into
//                 minus when given), z of (step, query);
//   kPerturbOnly  theta + eps z into plus, no update (materialize());
//   kConvert      theta into plus (evaluation);
//   kUpdate       the owed update alone (flush).
// run_pass() picks the kernels' instantiation (update_terms.cuh): the default one (MeZO-SGD,
// one query, query 0) or the owed update's rule with several queries, and checks that the
// policy holds the rule's state.
//
//   PlainPass        Fp32Codec, Bf16Codec, Fp16Codec: backend/cuda/perturb.cuh's group kernel by
//                    default, plain_kernel.cuh for the family
//   RowPass          Int8RowCodec: row_kernel.cuh
//   PackedGroupPass  Bf16PackedCodec: packed_kernel.cuh (its update can end before its outputs:
//                    head_bytes(), body_done)
#pragma once

#include <cuda_runtime.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include <zo2/backend/cuda/memory.cuh>
#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/packed_bf16.hpp>
#include <zo2/offload/packed_kernel.cuh>
#include <zo2/offload/plain_kernel.cuh>
#include <zo2/offload/row_kernel.cuh>
#include <zo2/offload/update_terms.cuh>
#include <zo2/optim/step_types.hpp>

namespace zo2::gpu::offload_detail {

enum class PassMode { kPerturb, kPerturbOnly, kConvert, kUpdate };

/// One pass over one group: where its master and rule state are (device), where its outputs go,
/// and the noise and owed update.
template <class T>
struct PassArgs {
  unsigned char* master = nullptr;
  void* state = nullptr;   // the group's rule state (state[slot * total_elements + element]); null if none
  bool state_bf16 = false; // the state's values are bf16, not fp32
  T* plus = nullptr;
  T* minus = nullptr;      // kPerturb only; null: the caller keeps one copy
  std::uint32_t first_tensor_id = 0;
  std::uint64_t seed = 0;
  std::uint32_t step = 0, query = 0;
  double eps = 0.0;
  const PendingUpdate* pending = nullptr;  // kPerturb (may be null) and kUpdate
  PassMode mode = PassMode::kPerturb;
};

/// What HostOffload asks of a codec's device side. `body_done` (may be null) is recorded once
/// the first head_bytes() bytes of the encoded group and the rule state are final, which can be
/// before the pass ends; 0 head bytes: nothing is final before the end. overflow(): values the
/// codec could not store since the start (the packed codec's escapes), blocking until known.
/// extra_device_bytes / kExtraAllocations: what it allocates beside its table, for the plan.
template <class P, class T>
concept DevicePass = requires(P& p, const P& cp, const PassArgs<T>& a, cudaStream_t s, const Event* e,
                              const typename P::GroupCodecT& codec) {
  p.template run<SgdRule, false>(a, s, e);
  p.template run<AdamRule, true>(a, s, e);
  { cp.head_bytes() } -> std::convertible_to<std::size_t>;
  { cp.overflow(s) } -> std::convertible_to<std::uint64_t>;
  { P::extra_device_bytes(codec) } -> std::convertible_to<std::size_t>;
  { P::kExtraAllocations } -> std::convertible_to<std::size_t>;
};

/// The elementwise codecs.
template <class Codec, class T>
class PlainPass {
 public:
  using GroupCodecT = offload::GroupCodec<Codec>;
  using S = typename Codec::storage;
  static constexpr std::size_t kExtraAllocations = 0;
  static std::size_t extra_device_bytes(const GroupCodecT&) { return 0; }

  PlainPass() = default;
  PlainPass(const GroupCodecT& codec, const ParamLayout& layout) : table_(layout), total_(codec.total_elements()) {}

  std::size_t head_bytes() const { return 0; }
  std::uint64_t overflow(cudaStream_t) const { return 0; }

  template <class Rule, bool Queries>
  void run(const PassArgs<T>& a, cudaStream_t stream, const Event* /*body_done*/) {
    S* theta = reinterpret_cast<S*>(a.master);
    if constexpr (is_plain_update_v<Rule, Queries>) {
      switch (a.mode) {
        case PassMode::kPerturb:
          update_and_perturb<S, T>(theta, a.plus, a.minus, table_, a.first_tensor_id, a.seed, a.step, a.eps, a.pending,
                                   stream);
          break;
        case PassMode::kPerturbOnly:
          perturb_into<S, T>(a.plus, theta, table_, a.first_tensor_id, a.seed, a.step, a.eps, stream);
          break;
        case PassMode::kConvert: convert<S, T>(a.plus, theta, table_, stream); break;
        case PassMode::kUpdate: update<S>(theta, table_, a.first_tensor_id, a.seed, *a.pending, stream); break;
      }
    } else {
      PlainArgs k{};
      k.first_tensor_id = a.first_tensor_id;
      k.seed = a.seed;
      k.step = a.step;
      k.query = a.query;
      k.eps = a.eps;
      if (a.pending) {
        set_plain_update(k, *a.pending);
        k.terms = update_terms(*a.pending, Rule::kStateSlots > 0 ? a.state : nullptr, total_, a.state_bf16);
      }
      switch (a.mode) {
        case PassMode::kPerturb: launch_plain_family<Rule, S, T>(theta, a.plus, a.minus, table_, k, stream); break;
        case PassMode::kPerturbOnly:
          launch_plain_family<Rule, S, T>(theta, a.plus, static_cast<T*>(nullptr), table_, k, stream);
          break;
        case PassMode::kConvert: convert<S, T>(a.plus, theta, table_, stream); break;
        case PassMode::kUpdate:
          launch_plain_family<Rule, S, T>(theta, static_cast<T*>(nullptr), static_cast<T*>(nullptr), table_, k, stream);
          break;
      }
    }
  }

 private:
  GroupTable table_;
  std::size_t total_ = 0;
};

/// The arguments the row and packed kernels share (RowArgs, PackedArgs name them alike).
template <class Args, class T>
void fill_shared_args(Args& k, const PassArgs<T>& a) {
  k.first_tensor_id = a.first_tensor_id;
  k.seed = a.seed;
  k.step = a.step;
  k.eps = a.eps;
  k.perturb = a.mode == PassMode::kPerturb || a.mode == PassMode::kPerturbOnly;
  k.convert = a.mode == PassMode::kConvert;
  if (a.pending) set_plain_update(k, *a.pending);
}

/// The row-scaled codec (int8 rows).
template <class Codec, class T>
class RowPass {
 public:
  using GroupCodecT = offload::GroupCodec<Codec>;
  static constexpr std::size_t kExtraAllocations = 0;
  static std::size_t extra_device_bytes(const GroupCodecT&) { return 0; }

  RowPass() = default;
  RowPass(const GroupCodecT& codec, const ParamLayout& layout)
      : table_(codec, layout), scales_offset_(codec.scales_offset()), total_(codec.total_elements()) {}

  std::size_t head_bytes() const { return 0; }
  std::uint64_t overflow(cudaStream_t) const { return 0; }

  template <class Rule, bool Queries>
  void run(const PassArgs<T>& a, cudaStream_t stream, const Event* /*body_done*/) {
    RowArgs k{};
    fill_shared_args(k, a);
    RowFamilyArgs f{};
    if constexpr (!is_plain_update_v<Rule, Queries>) {
      f.query = a.query;
      if (a.pending) f.terms = update_terms(*a.pending, Rule::kStateSlots > 0 ? a.state : nullptr, total_, a.state_bf16);
    }
    float* scales = reinterpret_cast<float*>(a.master + scales_offset_);
    launch_row_kernel<Codec, T, Rule, Queries>(a.master, scales, a.plus, a.minus, table_, k, stream, f);
  }

 private:
  RowTable table_;
  std::size_t scales_offset_ = 0, total_ = 0;
};

/// The packed bf16 codec. Its pass may split in two launches (PackedPass::run): the block's body
/// and the rule state are final after the first, before the escape lists are sorted.
template <class T>
class PackedGroupPass {
 public:
  using GroupCodecT = offload::PackedBf16Group;
  static constexpr std::size_t kExtraAllocations = PackedPass::kAllocations;
  static std::size_t extra_device_bytes(const GroupCodecT& codec) { return PackedPass::device_bytes(codec); }

  PackedGroupPass() = default;
  /// `codec` must outlive the pass.
  PackedGroupPass(const GroupCodecT& codec, const ParamLayout& layout)
      : pass_(codec, layout), head_(codec.counts_offset()), total_(codec.total_elements()) {}

  std::size_t head_bytes() const { return head_; }
  std::uint64_t overflow(cudaStream_t stream) const { return pass_.overflow(stream); }

  template <class Rule, bool Queries>
  void run(const PassArgs<T>& a, cudaStream_t stream, const Event* body_done) {
    PackedArgs k{};
    fill_shared_args(k, a);
    if constexpr (!is_plain_update_v<Rule, Queries>) {
      k.query = a.query;
      if (a.pending) k.terms = update_terms(*a.pending, Rule::kStateSlots > 0 ? a.state : nullptr, total_, a.state_bf16);
    }
    pass_.template run<T, Rule, Queries>(a.master, a.plus, a.minus, k, stream, body_done);
  }

 private:
  PackedPass pass_;
  std::size_t head_ = 0, total_ = 0;
};

/// The device pass of codec Codec writing T.
template <class Codec, class T>
struct DevicePassOf {
  using type = std::conditional_t<Codec::row_scaled, RowPass<Codec, T>, PlainPass<Codec, T>>;
};
template <class T>
struct DevicePassOf<offload::Bf16PackedCodec, T> {
  using type = PackedGroupPass<T>;
};

/// Runs `pass` on `a` with the kernels' instantiation the update needs: the default one for
/// MeZO-SGD with one query and query 0, else the owed update's rule with several queries.
/// `state_slots`: the rule state values per parameter the policy holds (a stateful rule needs
/// its own count).
template <class Pass, class T>
void run_pass(Pass& pass, const PassArgs<T>& a, unsigned state_slots, cudaStream_t stream, const Event* body_done) {
  if (a.query != 0 && a.mode != PassMode::kPerturb && a.mode != PassMode::kPerturbOnly)
    throw Error("HostOffload: a query index for a pass without noise");
  if (a.query >= kMaxQueries)
    throw ConfigError("queries", "HostOffload: query " + std::to_string(a.query) + " of at most " +
                                     std::to_string(kMaxQueries) + " queries");
  if (a.query == 0 && (!a.pending || a.pending->plain_sgd())) {
    pass.template run<SgdRule, false>(a, stream, body_done);
    return;
  }
  visit_rule(a.pending ? a.pending->rule : RuleId::kSgd, [&]<class Rule>(RuleTag<Rule>) {
    if constexpr (Rule::kStateSlots > 0)
      if (a.pending && Rule::kStateSlots > state_slots)
        throw ConfigError("optimizer", "HostOffload holds " + std::to_string(state_slots) +
                                           " rule state values per parameter, this update rule needs " +
                                           std::to_string(Rule::kStateSlots) + " (reserve_rule_state)");
    pass.template run<Rule, true>(a, stream, body_done);
  });
}

}  // namespace zo2::gpu::offload_detail
