// zo2/offload/packed_kernel.cuh -- the fused update / perturb pass over a group in the packed
// bf16 format (packed_bf16.hpp), in place in its device slot.
//
// Each thread takes one octet (8 elements), four threads one 32-element chunk, a warp eight
// chunks. A pass: decode the quad (an escaped element's exponent by binary search in its
// tensor's sorted escape list), apply the owed update exactly as the bf16 group kernel does
// (perturb.cuh: the same noise, updated_value and stochastic rounding to bf16 -- so the packed
// codec's weights are the bf16 codec's, bit for bit), re-encode against the chunk's new largest
// exponent (a reduction over its four threads), and write theta + eps z (and theta - eps z) in T.
// New escapes go to a scratch list by atomic append; cub::DeviceSegmentedSort then sorts every
// tensor's list (one segment each) and packed_store_escapes_kernel copies them into the block
// with their counts. An escape beyond a tensor's room (never seen with
// trained weights: the room is ~30x the rate of normal weights) is flushed to zero and counted
// in `overflow`, which the caller reports.
//
// The ZO optimizer family (update_terms.cuh): packed_kernel<T, Rule, Queries>. The default
// instantiation (SgdRule, one query) is the pass above; the others compute d = sum_i c_i z_i and
// Rule::apply with the element's state exactly as plain_kernel.cuh does for the bf16 codec, so
// the packed codec stays the bf16 codec bit for bit under every rule. Their perturbation draws z
// of PackedArgs::query.
#pragma once

#include <cuda_runtime.h>

#include <cub/device/device_segmented_sort.cuh>

#include <cstddef>
#include <cstdint>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/offload/packed_bf16.hpp>
#include <zo2/offload/update_terms.cuh>

namespace zo2::gpu::offload_detail {

/// One tensor of a packed group as the kernel sees it.
struct PackedTensorArgs {
  std::uint64_t offset, numel, escape_offset, escape_capacity;
  std::uint32_t index, weight_decay;
};

struct PackedArgs {
  const PackedTensorArgs* table;
  std::uint64_t codes_offset, exponents_offset, counts_offset, entries_offset;  // bytes into the block
  std::uint64_t* new_entries;             // scratch: tensor r's new escapes at scratch_offsets[r]
  const std::uint64_t* scratch_offsets;
  std::uint32_t* new_counts;   // scratch: one per tensor, zeroed before the pass
  std::uint32_t* overflow;     // escapes that found no room (flushed to zero)
  std::uint32_t first_tensor_id;
  std::uint64_t seed;
  std::uint32_t step, update_step;
  bool has_update, perturb, convert;
  double eps, lr, g, wd;
  // Read only by the family's instantiations (not SgdRule with one query):
  std::uint32_t query;  // the perturbation's query
  UpdateTerms terms;    // the update's coefficients, rule scalars and state
};

/// The exponent field of escaped element j of a tensor: binary search of its sorted list.
__device__ ZO2_FORCEINLINE unsigned escaped_exponent(const std::uint64_t* entries, std::uint32_t count, std::uint64_t j) {
  std::uint32_t lo = 0, hi = count;
  while (lo < hi) {
    const std::uint32_t mid = (lo + hi) / 2;
    if (offload::PackedBf16::entry_index(entries[mid]) < j) lo = mid + 1;
    else hi = mid;
  }
  // A corrupt block (no entry for j) decodes as exponent 0, i.e. a tiny value, rather than read
  // outside the list; host decode reports such blocks.
  return lo < count && offload::PackedBf16::entry_index(entries[lo]) == j ? offload::PackedBf16::entry_exponent(entries[lo])
                                                                          : 0u;
}

template <class T, class Rule = SgdRule, bool Queries = false>
__global__ void __launch_bounds__(256) packed_kernel(unsigned char* __restrict__ block, T* __restrict__ plus,
                                                     T* __restrict__ minus, PackedArgs a) {
  using offload::PackedBf16;
  constexpr bool kPlain = is_plain_update_v<Rule, Queries>;
  constexpr int kPer = 8;                                           // elements a thread takes: an octet
  constexpr unsigned kThreadsPerChunk = PackedBf16::kChunk / kPer;  // 4
  constexpr bool kFastUpdate = detail::fast_noise_for_v<bfloat16>;
  constexpr bool kFastPerturb = detail::fast_noise_for_v<T>;
  const PackedTensorArgs t = a.table[blockIdx.y];
  const std::uint32_t id = a.first_tensor_id + t.index;
  const UpdateCoeffs u{a.lr, a.g, t.weight_decay ? a.wd : 0.0};
  RuleCoeffs rc{};
  if constexpr (!kPlain) rc = tensor_rule(a.terms, t.weight_decay != 0);
  const std::uint32_t perturb_query = kPlain ? 0u : a.query;
  const std::uint64_t octets = (t.numel + PackedBf16::kChunk - 1) / PackedBf16::kChunk * kThreadsPerChunk;
  // Clamped to the room, so a corrupt count cannot send the search outside the tensor's list.
  const std::uint32_t stored_count = *reinterpret_cast<const std::uint32_t*>(block + a.counts_offset + 4 * t.index);
  const std::uint32_t old_count =
      stored_count < t.escape_capacity ? stored_count : static_cast<std::uint32_t>(t.escape_capacity);
  const std::uint64_t* old_entries =
      reinterpret_cast<const std::uint64_t*>(block + a.entries_offset) + t.escape_offset;
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  // The loop runs while any octet of the thread's warp is in the tensor (octets is a multiple of
  // 4 and a warp's 32 octets start at a multiple of 32), so the shuffles see whole chunks.
  const std::uint64_t warp_base = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u);
  for (std::uint64_t w = warp_base; w < octets; w += stride) {
    const std::uint64_t o = w + (threadIdx.x & 31u);  // octet within the tensor
    const bool live = o < octets;                     // inside one of the tensor's chunks
    const std::uint64_t j0 = kPer * o;                // first element within the tensor
    const std::uint64_t g0 = t.offset + j0;           // ... within the group
    std::uint16_t bits[kPer] = {};
    if (live) {
      const uint2 low8 = *reinterpret_cast<const uint2*>(block + g0);
      const std::uint32_t codes = *reinterpret_cast<const std::uint32_t*>(block + a.codes_offset + g0 / 2);
      const unsigned E = block[a.exponents_offset + g0 / PackedBf16::kChunk];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const unsigned code = (codes >> (4 * k)) & 0xfu;
        const unsigned e = code == PackedBf16::kEscape ? escaped_exponent(old_entries, old_count, j0 + k)
                                                       : PackedBf16::exponent_of(code, E);
        const std::uint32_t low = (k < 4 ? low8.x >> (8 * k) : low8.y >> (8 * (k - 4))) & 0xffu;
        bits[k] = PackedBf16::bits(static_cast<std::uint8_t>(low), e);
      }
    }
    float th[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) th[k] = load(bfloat16{bits[k]});
    if (a.has_update) {
      // The update exactly as the bf16 group kernel applies it (perturb.cuh): z of the update
      // step per quad, 16 rounding bits per element from the octet's words.
      const Philox4x32 words = rounding_words(a.seed, a.update_step, id, o);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if constexpr (kPlain) {
          const Normal4 z = detail::noise4<kFastUpdate>(a.seed, a.update_step, id, 2 * o + half);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int k = 4 * half + i;
            if (!live || j0 + k >= t.numel) continue;  // padding stays zero
            const bfloat16 b = store_rounded<bfloat16>(updated_value<bfloat16>(th[k], z.z[i], u),
                                                       rounding_bits(words, static_cast<unsigned>(k)), true);
            bits[k] = b.bits;
            th[k] = load(b);
          }
        } else {
          float d[4];
          direction4<kFastUpdate>(a.terms, a.seed, a.update_step, id, 2 * o + half, d);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int k = 4 * half + i;
            if (!live || j0 + k >= t.numel) continue;  // padding (and its state) stays zero
            const float v = apply_rule<Rule, true>(a.terms, rc, th[k], d[i], g0 + k);
            const bfloat16 b = store_rounded<bfloat16>(v, rounding_bits(words, static_cast<unsigned>(k)), true);
            bits[k] = b.bits;
            th[k] = load(b);
          }
        }
      }
      // Re-encode against the chunk's new largest exponent (its four threads).
      unsigned E = 0;
#pragma unroll
      for (int k = 0; k < kPer; ++k) E = max(E, PackedBf16::exponent(bits[k]));
      E = max(E, __shfl_xor_sync(0xffffffffu, E, 1));
      E = max(E, __shfl_xor_sync(0xffffffffu, E, 2));
      if (live) {
        uint2 low8 = make_uint2(0u, 0u);
        std::uint32_t codes = 0;
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const unsigned e = PackedBf16::exponent(bits[k]);
          unsigned code = PackedBf16::code(e, E);
          if (code == PackedBf16::kEscape) {
            const std::uint32_t at = atomicAdd(a.new_counts + t.index, 1u);
            if (at < t.escape_capacity) {
              a.new_entries[a.scratch_offsets[blockIdx.y] + at] = PackedBf16::escape_entry(j0 + k, e);
            } else {
              atomicAdd(a.overflow, 1u);
              code = PackedBf16::kZeroExponent;  // flushed to the subnormal of its sign and mantissa
              th[k] = load(bfloat16{PackedBf16::bits(PackedBf16::low_byte(bits[k]), 0)});
            }
          }
          const std::uint32_t low = PackedBf16::low_byte(bits[k]);
          if (k < 4) low8.x |= low << (8 * k);
          else low8.y |= low << (8 * (k - 4));
          codes |= code << (4 * k);
        }
        *reinterpret_cast<uint2*>(block + g0) = low8;
        *reinterpret_cast<std::uint32_t*>(block + a.codes_offset + g0 / 2) = codes;
        if (o % kThreadsPerChunk == 0) block[a.exponents_offset + g0 / PackedBf16::kChunk] = static_cast<unsigned char>(E);
      }
    }
    if (!live || j0 >= t.numel || (!a.perturb && !a.convert)) continue;
    const std::uint64_t valid = t.numel - j0;
    if (a.perturb) {
      float z[kPer];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const Normal4 n = detail::noise4<kFastPerturb>(a.seed, a.step, id, 2 * o + half, perturb_query);
#pragma unroll
        for (int i = 0; i < 4; ++i) z[4 * half + i] = n.z[i];
      }
      T out[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[k] = detail::to_output_device<T>(perturbed_value<bfloat16>(th[k], z[k], a.eps));
      detail::store_masked(plus + g0, out, valid);
      if (minus) {
#pragma unroll
        for (int k = 0; k < kPer; ++k) out[k] = detail::to_output_device<T>(perturbed_value<bfloat16>(th[k], z[k], -a.eps));
        detail::store_masked(minus + g0, out, valid);
      }
    } else {
      T out[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[k] = detail::to_output_device<T>(th[k]);
      detail::store_masked(plus + g0, out, valid);
    }
  }
}

/// Where each tensor's new escape list ends in the scratch: its start plus its count, capped at
/// its room (what the pass appended beyond it was flushed and counted in `overflow`).
template <int = 0>  // (a template of nothing, so that every translation unit may define it)
__global__ void packed_escape_ends_kernel(const PackedTensorArgs* __restrict__ table,
                                          const std::uint64_t* __restrict__ scratch_offsets,
                                          const std::uint32_t* __restrict__ new_counts, std::uint64_t* __restrict__ ends,
                                          std::uint32_t tensors) {
  for (std::uint32_t r = blockIdx.x * blockDim.x + threadIdx.x; r < tensors; r += gridDim.x * blockDim.x)
    ends[r] = scratch_offsets[r] + (new_counts[r] < table[r].escape_capacity ? new_counts[r] : table[r].escape_capacity);
}

/// Copies each tensor's escape list, sorted by index (cub::DeviceSegmentedSort into `sorted`, at
/// the scratch's offsets), into the block, with its count. One block of threads per tensor.
template <int = 0>
__global__ void __launch_bounds__(1024) packed_store_escapes_kernel(unsigned char* __restrict__ block,
                                                                    const PackedTensorArgs* __restrict__ table,
                                                                    std::uint64_t counts_offset, std::uint64_t entries_offset,
                                                                    const std::uint64_t* __restrict__ sorted,
                                                                    const std::uint64_t* __restrict__ scratch_offsets,
                                                                    const std::uint64_t* __restrict__ ends) {
  const PackedTensorArgs t = table[blockIdx.x];
  const std::uint64_t begin = scratch_offsets[blockIdx.x], count = ends[blockIdx.x] - begin;
  std::uint64_t* out = reinterpret_cast<std::uint64_t*>(block + entries_offset) + t.escape_offset;
  for (std::uint64_t i = threadIdx.x; i < count; i += blockDim.x) out[i] = sorted[begin + i];
  if (threadIdx.x == 0) reinterpret_cast<std::uint32_t*>(block + counts_offset)[t.index] = static_cast<std::uint32_t>(count);
}

/// The device side of one packed group kind: its table, scratch for new escape lists and the
/// sort, the overflow counter. Allocated once (no allocation in the steady state).
class PackedPass {
 public:
  PackedPass() = default;
  /// cub::DeviceSegmentedSort's temporary storage for `items` entries in `segments` lists.
  static std::size_t sort_temp_bytes(std::uint64_t items, std::uint32_t segments) {
    std::size_t bytes = 0;
    ZO2_CUDA_CHECK(cub::DeviceSegmentedSort::SortKeys(nullptr, bytes, static_cast<const std::uint64_t*>(nullptr),
                                                      static_cast<std::uint64_t*>(nullptr),
                                                      static_cast<std::int64_t>(items), static_cast<std::int64_t>(segments),
                                                      static_cast<const std::uint64_t*>(nullptr),
                                                      static_cast<const std::uint64_t*>(nullptr)));
    return bytes;
  }
  /// Device bytes a pass over groups packed by `codec` allocates, and how many allocations: the
  /// table, every tensor's room for new escapes twice (as appended, and sorted), each list's
  /// start and end, the counts, the overflow counter and the sort's temporary storage.
  static std::size_t device_bytes(const offload::PackedBf16Group& codec) {
    std::uint64_t entries = 0;
    for (std::size_t r = 0; r < codec.num_tensors(); ++r) entries += codec.tensor(r).escape_capacity;
    const auto tensors = static_cast<std::uint32_t>(codec.num_tensors());
    if (tensors == 0) return 0;
    return 2 * entries * sizeof(std::uint64_t) +
           tensors * (sizeof(PackedTensorArgs) + 2 * sizeof(std::uint64_t) + sizeof(std::uint32_t)) +
           sizeof(std::uint32_t) + sort_temp_bytes(entries, tensors);
  }
  static constexpr std::size_t kAllocations = 8;

  /// For groups laid out as `layout` and packed by `codec` (which must outlive the pass).
  PackedPass(const offload::PackedBf16Group& codec, const ParamLayout& layout) : codec_(&codec) {
    std::vector<std::uint64_t> scratch_offsets;
    std::uint64_t scratch = 0;
    for (std::size_t r = 0; r < codec.num_tensors(); ++r) {
      const auto& t = codec.tensor(r);
      host_table_.push_back({t.offset, t.numel, t.escape_offset, t.escape_capacity, static_cast<std::uint32_t>(r),
                             layout.spec(r).weight_decay ? 1u : 0u});
      scratch_offsets.push_back(scratch);
      scratch += t.escape_capacity;
    }
    num_tensors_ = static_cast<std::uint32_t>(host_table_.size());
    if (num_tensors_ == 0) return;
    table_ = DeviceBuffer<PackedTensorArgs>(host_table_.size());
    scratch_offsets_ = DeviceBuffer<std::uint64_t>(host_table_.size());
    new_counts_ = DeviceBuffer<std::uint32_t>(host_table_.size());
    new_entries_ = DeviceBuffer<std::uint64_t>(scratch);
    sorted_ = DeviceBuffer<std::uint64_t>(scratch);
    ends_ = DeviceBuffer<std::uint64_t>(host_table_.size());
    overflow_ = DeviceBuffer<std::uint32_t>(1);
    scratch_entries_ = scratch;
    sort_temp_bytes_ = sort_temp_bytes(scratch, num_tensors_);
    sort_temp_ = DeviceBuffer<unsigned char>(sort_temp_bytes_ > 0 ? sort_temp_bytes_ : 1);
    ZO2_CUDA_CHECK(cudaMemcpy(table_.data(), host_table_.data(), host_table_.size() * sizeof(PackedTensorArgs),
                              cudaMemcpyHostToDevice));
    ZO2_CUDA_CHECK(cudaMemcpy(scratch_offsets_.data(), scratch_offsets.data(),
                              scratch_offsets.size() * sizeof(std::uint64_t), cudaMemcpyHostToDevice));
    fill_device_blocking(overflow_.data(), 0, sizeof(std::uint32_t));  // and waits for the copies above
  }

  /// The pass over `block` (a device slot holding the group packed), then its escape lists
  /// sorted into place. a's table, offsets and scratch are filled in here.
  ///
  /// `body_done`, when given, is recorded as soon as the block's body is final: from there on
  /// only the counts and escape lists (from codec.counts_offset() on) change, so the body can be
  /// copied out while the rest runs. With an update and outputs to write, the pass is then split
  /// in two launches: update and re-encode (body_done), the sort, then the outputs decoded from
  /// the updated block (the same values: the format is exact). The write-back starts after the
  /// first launch instead of the whole fused pass, which is what a two-slot HostOffload waits
  /// on before the next upload into that slot.
  ///
  /// Rule and Queries pick the kernel's instantiation (update_terms.cuh): the default one reads
  /// a.lr, a.g, a.wd; the others a.terms and a.query.
  template <class T, class Rule = SgdRule, bool Queries = false>
  void run(unsigned char* block, T* plus, T* minus, PackedArgs a, cudaStream_t stream,
           const Event* body_done = nullptr) {
    static_assert(Rule::kStateSlots == 0 || Queries, "stateful rules use the general (several-query) instantiation");
    if (num_tensors_ == 0) return;
    a.table = table_.data();
    a.codes_offset = codec_->codes_offset();
    a.exponents_offset = codec_->exponents_offset();
    a.counts_offset = codec_->counts_offset();
    a.entries_offset = codec_->entries_offset();
    a.new_entries = new_entries_.data();
    a.scratch_offsets = scratch_offsets_.data();
    a.new_counts = new_counts_.data();
    a.overflow = overflow_.data();
    ZO2_CUDA_CHECK(cudaMemsetAsync(new_counts_.data(), 0, num_tensors_ * sizeof(std::uint32_t), stream));
    std::uint64_t most = 0;
    for (const auto& t : host_table_) most = t.numel > most ? t.numel : most;
    const std::uint64_t octets = (most + 31) / 32 * 4;
    const unsigned blocks = static_cast<unsigned>(octets / 256 + 1 < 1024 ? octets / 256 + 1 : 1024);
    const dim3 grid(blocks, num_tensors_);
    const bool split = body_done && a.has_update && (a.perturb || a.convert);
    PackedArgs first = a;
    if (split) first.perturb = first.convert = false;
    packed_kernel<T, Rule, Queries><<<grid, 256, 0, stream>>>(block, plus, minus, first);
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::offload_detail::packed_kernel");
    if (body_done) body_done->record(stream);
    if (!a.has_update) return;  // the lists are unchanged
    store_sorted_escapes(block, a, stream);
    if (!split) return;
    PackedArgs second = a;
    second.has_update = false;  // decode the updated block and its sorted lists; write the outputs
    packed_kernel<T, Rule, Queries><<<grid, 256, 0, stream>>>(block, plus, minus, second);
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::offload_detail::packed_kernel (outputs)");
  }

  /// The pass's new escape lists, sorted by element index, into the block with their counts.
  void store_sorted_escapes(unsigned char* block, const PackedArgs& a, cudaStream_t stream) {
    packed_escape_ends_kernel<><<<1, 256, 0, stream>>>(table_.data(), scratch_offsets_.data(), new_counts_.data(),
                                                        ends_.data(), num_tensors_);
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::offload_detail::packed_escape_ends_kernel");
    std::size_t temp_bytes = sort_temp_bytes_;
    ZO2_CUDA_CHECK(cub::DeviceSegmentedSort::SortKeys(sort_temp_.data(), temp_bytes,
                                                      static_cast<const std::uint64_t*>(new_entries_.data()),
                                                      sorted_.data(), static_cast<std::int64_t>(scratch_entries_),
                                                      static_cast<std::int64_t>(num_tensors_),
                                                      static_cast<const std::uint64_t*>(scratch_offsets_.data()),
                                                      static_cast<const std::uint64_t*>(ends_.data()), stream));
    packed_store_escapes_kernel<><<<num_tensors_, 1024, 0, stream>>>(block, table_.data(), a.counts_offset,
                                                                     a.entries_offset, sorted_.data(),
                                                                     scratch_offsets_.data(), ends_.data());
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::offload_detail::packed_store_escapes_kernel");
  }

  /// Escapes that found no room since the last reset (each flushed to zero): blocks until known.
  std::uint32_t overflow(cudaStream_t stream) const {
    std::uint32_t n = 0;
    if (num_tensors_ == 0) return 0;
    ZO2_CUDA_CHECK(cudaMemcpyAsync(&n, overflow_.data(), sizeof n, cudaMemcpyDeviceToHost, stream));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream));
    return n;
  }

 private:
  const offload::PackedBf16Group* codec_ = nullptr;
  std::vector<PackedTensorArgs> host_table_;
  std::uint32_t num_tensors_ = 0;
  DeviceBuffer<PackedTensorArgs> table_;
  DeviceBuffer<std::uint64_t> scratch_offsets_, new_entries_, sorted_, ends_;
  DeviceBuffer<std::uint32_t> new_counts_, overflow_;
  DeviceBuffer<unsigned char> sort_temp_;
  std::uint64_t scratch_entries_ = 0;
  std::size_t sort_temp_bytes_ = 0;
};

}  // namespace zo2::gpu::offload_detail
