// The offload plan's arithmetic (offload/offload_plan.cuh: host code, no device): the device
// bytes of the prologue's perturbed copy, own or shared with the blocks' (prologue_scratch_shared).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>

#include <zo2/core/half_types.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/offload_plan.cuh>
#include <zo2/offload/packed_bf16.hpp>

using namespace zo2;

namespace {

/// A device pass that allocates nothing beside its table (as the plain codecs' passes).
struct NoExtraPass {
  static constexpr std::size_t kExtraAllocations = 0;
  template <class G>
  static std::size_t extra_device_bytes(const G&) {
    return 0;
  }
};

/// An embedding-like prologue of `vocab` x 64, blocks of 64 x 64 (+ bias), an LM head of vocab x 64.
ModelLayout layout(std::int64_t vocab, std::size_t blocks) {
  ParamLayout prologue, block, epilogue;
  prologue.add("embed", {vocab, 64});
  block.add("w", {64, 64});
  block.add("b", {64}, false);
  epilogue.add("lm_head", {vocab, 64});
  return ModelLayout(prologue, block, blocks, epilogue);
}

using Codec = offload::GroupCodecOf<offload::Bf16Codec>::type;
gpu::OffloadPlan plan(const ModelLayout& ml, const gpu::OffloadOptions& o) {
  return gpu::offload_detail::make_plan<Codec, NoExtraPass, bfloat16>(ml, o);
}

std::size_t aligned_bf16(std::size_t elements) { return (elements * sizeof(bfloat16) + 255) / 256 * 256; }

}  // namespace

TEST_CASE("prologue_scratch_shared drops the prologue's perturbed copy from the plan, one copy or two") {
  for (const std::int64_t vocab : {1000, 10, 40}) {  // a prologue larger than a block, smaller, near it
    for (const bool one_copy : {true, false}) {
      CAPTURE(vocab);
      CAPTURE(one_copy);
      const ModelLayout ml = layout(vocab, 6);
      gpu::OffloadOptions own, shared;
      own.one_perturbed_copy = shared.one_perturbed_copy = one_copy;
      shared.prologue_scratch_shared = true;
      const gpu::OffloadPlan a = plan(ml, own), b = plan(ml, shared);
      const std::size_t pro = ml.layout(ml.prologue()).total_elements(), blk = ml.layout(ml.block(0)).total_elements(),
                        epi = ml.layout(ml.epilogue()).total_elements();
      const std::size_t copies = one_copy ? 1 : 2;
      const std::size_t saved =
          copies * (aligned_bf16(pro) + aligned_bf16(std::max(blk, epi)) - aligned_bf16(std::max({pro, blk, epi})));
      CHECK(a.fixed_bytes - b.fixed_bytes == saved);
      CHECK(saved > 0);
      CHECK(a.minimum_bytes - b.minimum_bytes == saved);
      CHECK(a.arena_bytes - b.arena_bytes == saved);
      CHECK_FALSE(a.prologue_scratch_shared);
      CHECK(b.prologue_scratch_shared);
      // Nothing else moves: the blocks stream through the same slots.
      CHECK(a.streamed_blocks == b.streamed_blocks);
      CHECK(a.slots == b.slots);
      CHECK(a.host_pinned_bytes == b.host_pinned_bytes);
    }
  }
}

TEST_CASE("prologue_scratch_shared frees budget for resident blocks") {
  const ModelLayout ml = layout(100000, 8);  // a large embedding: its copy is worth blocks
  gpu::OffloadOptions own, shared;
  shared.prologue_scratch_shared = true;
  const gpu::OffloadPlan a0 = plan(ml, own);
  own.gpu_memory_budget = shared.gpu_memory_budget = a0.minimum_bytes + 3 * a0.slot_bytes();
  const gpu::OffloadPlan a = plan(ml, own), b = plan(ml, shared);
  CHECK(b.resident_blocks > a.resident_blocks);
  CHECK(b.device_bytes() <= own.gpu_memory_budget);
}
