// No allocation in a steady-state step: cudaFree waits for the whole device (and breaks the
// overlap of one step's write-back with the next step's uploads), so after the first step of a
// shape, MeZO steps, evaluations and logits on the GPU must allocate and free nothing. Counted
// two ways: DeviceBuffer's own counters (device_buffer_stats), and every cudaMalloc/cudaFree this
// program makes (the link wraps them, tests/CMakeLists.txt; where it cannot, only the first).
// Runs OPTCudaModel<float> on the Hugging Face fixture opt_preln with the resident policy and the
// offload policy (every block streamed through two slots, and a budget keeping some resident).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <zo2/backend/cuda/memory.cuh>
#include <zo2/models/opt/cuda/opt_cuda_model.cuh>
#include <zo2/models/opt/opt.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/cuda_resident.cuh>
#include <zo2/offload/host_offload.cuh>
#include <zo2/zo2.hpp>

#include "../support/opt_fixtures.hpp"

// ---- counting every cudaMalloc / cudaFree of this program ----------------------------------------
namespace raw_count {
std::uint64_t mallocs = 0, frees = 0;  // the test runs on one thread
#ifdef ZO2_TEST_WRAP_CUDA_MALLOC
constexpr bool kEnabled = true;
#else
constexpr bool kEnabled = false;
#endif
}  // namespace raw_count

#ifdef ZO2_TEST_WRAP_CUDA_MALLOC
extern "C" cudaError_t __real_cudaMalloc(void** ptr, size_t size);
extern "C" cudaError_t __real_cudaFree(void* ptr);
extern "C" cudaError_t __wrap_cudaMalloc(void** ptr, size_t size) {
  ++raw_count::mallocs;
  return __real_cudaMalloc(ptr, size);
}
extern "C" cudaError_t __wrap_cudaFree(void* ptr) {
  if (ptr) ++raw_count::frees;
  return __real_cudaFree(ptr);
}
#endif

using namespace zo2;
using namespace zo2_test::opt_fixtures;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::gpu::device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_step_allocations)\n");
  return ok;
}();

struct Counts {
  std::uint64_t buffer_allocs, buffer_frees, raw_mallocs, raw_frees;
  static Counts now() {
    auto& s = zo2::gpu::device_buffer_stats();
    return {s.allocations.load(), s.frees.load(), raw_count::mallocs, raw_count::frees};
  }
};

/// Asserts that nothing was allocated or freed since `before`.
void check_none_since(const Counts& before, const char* what) {
  CAPTURE(std::string(what));
  const Counts after = Counts::now();
  CHECK(after.buffer_allocs - before.buffer_allocs == 0);
  CHECK(after.buffer_frees - before.buffer_frees == 0);
  if (raw_count::kEnabled) {
    CHECK(after.raw_mallocs - before.raw_mallocs == 0);
    CHECK(after.raw_frees - before.raw_frees == 0);
  }
}

using Model = opt::OPTCudaModel<float>;
using HostBatch = Expected::Batch;

/// The fixture's batch with its tokens shifted by `salt` (same shape, other values).
HostBatch salted(const HostBatch& b, std::int32_t salt, std::int64_t vocab) {
  HostBatch r = b;
  for (auto& id : r.input_ids) id = static_cast<std::int32_t>((id + salt) % vocab);
  for (auto& l : r.labels)
    if (l != -100) l = static_cast<std::int32_t>((l + salt) % vocab);
  return r;
}

/// Logits of `batch` at theta, group by group through the policy's current() (as zo2-opt's
/// engine does for generation, so streamed blocks pass through the slots).
template <class Policy>
std::vector<float> streamed_logits(const Model& model, Policy& policy, const Model::Batch& batch,
                                   Model::Activation (&hidden)[2], Model::Workspace& ws) {
  const ModelLayout& ml = policy.model_layout();
  const auto prologue = policy.current(ml.prologue());
  std::size_t cur = 0;
  model.prologue(prologue, batch, hidden[cur], ws);
  for (std::size_t i = 0; i < ml.num_blocks(); ++i) {
    model.forward_block(i, policy.current(ml.block(i)), hidden[cur], hidden[1 - cur], ws);
    cur = 1 - cur;
  }
  return model.output_logits(policy.current(ml.epilogue()), prologue, hidden[cur], ws);
}

/// Steps, evaluations and logits under `policy`: the first of each allocates what it needs, the
/// ones after it (other tokens, same or smaller shapes) nothing.
template <class Policy>
void check_steady_state(Policy& policy, const Model& model, const Expected& x) {
  ZOConfig zc;
  zc.lr = 1e-3, zc.eps = 1e-2, zc.weight_decay = 0.1, zc.seed = 7;
  ZOOptimizer<Model, Policy> optimizer(model, policy, zc);
  Model::Batch batch;
  const std::int64_t vocab = model.config().vocab_size;

  model.upload_batch(x.batch, batch);
  optimizer.step(batch);  // the first step: activations, workspace, scratch, GEMM plans
  optimizer.evaluate(batch);
  Model::Activation hidden[2];
  Model::Workspace ws;
  const std::vector<float> first = streamed_logits(model, policy, batch, hidden, ws);
  ZO2_CUDA_CHECK(cudaStreamSynchronize(policy.stream()));

  const Counts before = Counts::now();
  for (std::int32_t s = 1; s <= 4; ++s) {
    CAPTURE(s);
    model.upload_batch(salted(x.batch, s, vocab), batch);
    const StepResult r = optimizer.step(batch);
    CHECK(std::isfinite(r.loss_plus));
    CHECK(std::isfinite(r.loss_minus));
  }
  check_none_since(before, "MeZO steps on same-shaped batches");

  // A smaller batch (one unpadded row) fits in what the first one allocated.
  model.upload_batch(x.unpadded, batch);
  optimizer.step(batch);
  const double loss = optimizer.evaluate(batch);
  CHECK(std::isfinite(loss));
  model.upload_batch(x.batch, batch);
  const std::vector<float> again = streamed_logits(model, policy, batch, hidden, ws);
  CHECK(again.size() == first.size());
  check_none_since(before, "smaller batch, evaluate, logits");
}

}  // namespace

TEST_CASE("DeviceBuffer::reserve grows with headroom and never shrinks" * doctest::skip(!kHaveDevice)) {
  const Counts before = Counts::now();
  zo2::gpu::DeviceBuffer<float> b;
  b.reserve(100);
  CHECK(b.size() == 100);  // the first allocation is exact
  b.reserve(101);
  CHECK(b.size() == 150);  // growing again takes 1.5x
  for (std::size_t n = 102; n <= 150; ++n) b.reserve(n);
  b.reserve(10);
  CHECK(b.size() == 150);
  b.reserve(1000);
  CHECK(b.size() == 1000);  // more than 1.5x: exactly what was asked
  const Counts after = Counts::now();
  CHECK(after.buffer_allocs - before.buffer_allocs == 3);
  CHECK(after.buffer_frees - before.buffer_frees == 2);
}

TEST_CASE("after the first step, steps, evaluation and logits allocate nothing: resident" *
          doctest::skip(!kHaveDevice)) {
  auto loaded = opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  const Expected x = read_expected("opt_preln");
  zo2::gpu::Stream stream;
  zo2::gpu::CudaResident<float, float> policy(loaded.store, stream.get());
  const Model model(loaded.config, stream.get());
  check_steady_state(policy, model, x);
}

TEST_CASE("after the first step, steps, evaluation and logits allocate nothing: offloaded" *
          doctest::skip(!kHaveDevice)) {
  auto loaded = opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  const Expected x = read_expected("opt_preln");
  SUBCASE("bf16, every block streamed") {
    zo2::gpu::HostOffload<offload::Bf16Codec, float> policy(loaded.store);
    REQUIRE(policy.plan().streamed_blocks == static_cast<std::size_t>(loaded.config.num_hidden_layers));
    const Model model(loaded.config, policy.stream());
    check_steady_state(policy, model, x);
  }
  SUBCASE("int8, two perturbed copies") {
    zo2::gpu::OffloadOptions o;
    o.one_perturbed_copy = false;
    zo2::gpu::HostOffload<offload::Int8RowCodec, float> policy(loaded.store, o);
    const Model model(loaded.config, policy.stream());
    check_steady_state(policy, model, x);
  }
  SUBCASE("fp32 with three slots") {
    zo2::gpu::OffloadOptions o;
    o.slots = 3;
    zo2::gpu::HostOffload<offload::Fp32Codec, float> policy(loaded.store, o);
    const Model model(loaded.config, policy.stream());
    check_steady_state(policy, model, x);
  }
}

TEST_CASE("logits streamed group by group equal the whole-model logits" * doctest::skip(!kHaveDevice)) {
  auto loaded = opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  const Expected x = read_expected("opt_preln");
  zo2::gpu::Stream stream;
  zo2::gpu::CudaResident<float, float> resident(loaded.store, stream.get());
  const Model model(loaded.config, stream.get());
  const ModelLayout& ml = resident.model_layout();
  Model::Params params{resident.current(ml.prologue()), {}, resident.current(ml.epilogue())};
  for (std::size_t i = 0; i < ml.num_blocks(); ++i) params.blocks.push_back(resident.current(ml.block(i)));
  const Model::Batch batch = model.make_batch(x.batch);
  Model::Workspace ws;
  const std::vector<float> whole = model.logits(params, batch, ws);

  zo2::gpu::HostOffload<offload::Fp32Codec, float> offloaded(loaded.store);
  const Model streamed_model(loaded.config, offloaded.stream());
  const Model::Batch streamed_batch = streamed_model.make_batch(x.batch);
  Model::Activation hidden[2];
  Model::Workspace ws2;
  const std::vector<float> streamed = streamed_logits(streamed_model, offloaded, streamed_batch, hidden, ws2);
  REQUIRE(streamed.size() == whole.size());
  std::size_t differ = 0;
  for (std::size_t i = 0; i < whole.size(); ++i) differ += whole[i] != streamed[i];
  CHECK(differ == 0);  // fp32 codec: the same weights, the same kernels, bit for bit
}
