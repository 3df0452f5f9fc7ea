// HostOffload against the all-resident GPU policy, on a small user-defined layer stack written
// here with tiny CUDA kernels: same g and theta (fp32 codec), loss falls (bf16, int8), the
// device memory bound holds, uploads overlap compute, eval mode gives the loss at theta.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/host_offload.cuh>
#if __has_include(<zo2/offload/cuda_resident.cuh>)
#include <zo2/offload/cuda_resident.cuh>
#define ZO2_TEST_HAVE_CUDA_RESIDENT 1
#endif

using namespace zo2;
using namespace zo2::gpu;

namespace {

bool gpu_or_skip(const char* what) {
  const bool ok = device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_host_offload: %s)\n", what);
  return ok;
}

__device__ inline unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void spin_kernel(unsigned long long ns) {
  const unsigned long long t0 = global_ns();
  while (global_ns() - t0 < ns) {
  }
}

// prologue: h[r, c] = x[r, c] * w[c] + b[c]
__global__ void prologue_kernel(const float* x, const float* w, const float* b, float* h, int rows, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < rows * width) h[i] = x[i] * w[i % width] + b[i % width];
}
// block: out[r, o] = in[r, o] + tanh(sum_i W[o, i] in[r, i] + b[o] + extra[o])
__global__ void block_kernel(const float* W, const float* b, const float* extra, const float* in, float* out,
                             int rows, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * width) return;
  const int r = i / width, o = i % width;
  float acc = b[o] + (extra ? extra[o] : 0.0f);
  for (int k = 0; k < width; ++k) acc += W[o * width + k] * in[r * width + k];
  out[i] = in[i] + tanhf(acc);
}
// epilogue: loss = mean_r (sum_c h[r, c] w[c] + b - y[r])^2, one block
__global__ void loss_kernel(const float* h, const float* w, const float* b, const float* y, int rows, int width,
                            double* loss) {
  __shared__ double part[256];
  double acc = 0;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    float yh = b[0];
    for (int c = 0; c < width; ++c) yh += h[r * width + c] * w[c];
    const double d = static_cast<double>(yh) - y[r];
    acc += d * d;
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int k = 0; k < static_cast<int>(blockDim.x); ++k) s += part[k];
    *loss = s / rows;
  }
}

/// A residual tanh MLP on the GPU. `bulk` elements of extra block parameters (only the first
/// `width` are read) make blocks as large as a test needs; `spin_ns` makes each block forward
/// take at least that long.
struct TinyCudaStack {
  using value_type = float;
  struct Batch {
    int rows = 0;
    DeviceBuffer<float> x, y;
  };
  struct Activation {
    DeviceBuffer<float> h;
  };
  struct Workspace {
    DeviceBuffer<double> loss{1};
  };

  int width = 16;
  std::size_t blocks = 5;
  std::size_t bulk = 0;
  unsigned long long spin_ns = 0;
  cudaStream_t stream = nullptr;

  std::size_t num_blocks() const { return blocks; }
  ParamLayout prologue_layout() const {
    ParamLayout l;
    l.add("in.scale", {width}, false);
    l.add("in.bias", {width}, false);
    return l;
  }
  ParamLayout block_layout() const {
    ParamLayout l;
    l.add("weight", {width, width});
    l.add("bias", {width}, false);
    if (bulk) l.add("bulk", {static_cast<std::int64_t>(bulk / 1024), 1024});
    return l;
  }
  ParamLayout epilogue_layout() const {
    ParamLayout l;
    l.add("out.weight", {1, width});
    l.add("out.bias", {1}, false);
    return l;
  }
  static int grid(int n) { return (n + 255) / 256; }
  void prologue(ParamView<const float> p, const Batch& b, Activation& out, Workspace&) const {
    out.h.reserve(static_cast<std::size_t>(b.rows) * width);
    prologue_kernel<<<grid(b.rows * width), 256, 0, stream>>>(b.x.data(), p.tensor(0), p.tensor(1), out.h.data(),
                                                             b.rows, width);
  }
  void forward_block(std::size_t, ParamView<const float> p, const Activation& in, Activation& out, Workspace&) const {
    const int rows = static_cast<int>(in.h.size() / width);
    out.h.reserve(in.h.size());
    if (spin_ns) spin_kernel<<<1, 1, 0, stream>>>(spin_ns);
    block_kernel<<<grid(rows * width), 256, 0, stream>>>(p.tensor(0), p.tensor(1), bulk ? p.tensor(2) : nullptr,
                                                         in.h.data(), out.h.data(), rows, width);
  }
  double epilogue(ParamView<const float> p, ParamView<const float>, const Activation& in, const Batch& b,
                  Workspace& ws) const {
    loss_kernel<<<1, 256, 0, stream>>>(in.h.data(), p.tensor(0), p.tensor(1), b.y.data(), b.rows, width,
                                       ws.loss.data());
    double loss = 0;
    ZO2_CUDA_CHECK(cudaMemcpyAsync(&loss, ws.loss.data(), sizeof loss, cudaMemcpyDeviceToHost, stream));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream));
    return loss;
  }
};
static_assert(LayerStack<TinyCudaStack>);

TinyCudaStack::Batch make_batch(int rows, int width, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(rows) * width), y(rows);
  for (int r = 0; r < rows; ++r) {
    double dot = 0;
    for (int c = 0; c < width; ++c) {
      x[r * width + c] = u(rng);
      dot += x[r * width + c] * (0.3 + 0.05 * c);
    }
    y[r] = static_cast<float>(std::sin(dot));
  }
  TinyCudaStack::Batch b;
  b.rows = rows;
  b.x = DeviceBuffer<float>(x.size());
  b.y = DeviceBuffer<float>(y.size());
  ZO2_CUDA_CHECK(cudaMemcpy(b.x.data(), x.data(), x.size() * 4, cudaMemcpyHostToDevice));
  ZO2_CUDA_CHECK(cudaMemcpy(b.y.data(), y.data(), y.size() * 4, cudaMemcpyHostToDevice));
  return b;
}

ParameterStore<float> make_store(const TinyCudaStack& m, unsigned seed) {
  ParameterStore<float> store(ModelLayout::of(m));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const auto& ml = store.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    auto v = store.group(GroupIndex{g});
    for (std::size_t r = 0; r < v.layout().num_tensors(); ++r) {
      const auto& spec = v.layout().spec(r);
      const float sd = 0.8f / std::sqrt(static_cast<float>(spec.shape.back()));
      for (std::size_t j = 0; j < spec.numel(); ++j) v.tensor(r)[j] = sd * n(rng) + (spec.name == "in.scale" ? 1.0f : 0.0f);
    }
  }
  return store;
}

ZOConfig config() {
  ZOConfig c;
  c.lr = 2e-3;
  c.eps = 1e-3;
  c.weight_decay = 0.01;
  c.seed = 42;
  return c;
}

double max_abs_diff(const ParameterStore<float>& a, const ParameterStore<float>& b) {
  double worst = 0;
  const auto& ml = a.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    const auto va = a.group(GroupIndex{g});
    const auto vb = b.group(GroupIndex{g});
    for (std::size_t j = 0; j < va.layout().total_elements(); ++j)
      worst = std::max(worst, static_cast<double>(std::fabs(va.data()[j] - vb.data()[j])));
  }
  return worst;
}

/// Runs `steps` steps with `policy`, returns the step results; flushes at the end.
template <class Policy>
std::vector<StepResult> run_steps(TinyCudaStack model, Policy& policy, const TinyCudaStack::Batch& batch, int steps,
                                  double* eval_loss = nullptr) {
  model.stream = policy.stream();
  ZOOptimizer<TinyCudaStack, Policy> opt(model, policy, config());
  std::vector<StepResult> out;
  for (int s = 0; s < steps; ++s) out.push_back(opt.step(batch));
  if (eval_loss) *eval_loss = opt.evaluate(batch);
  opt.flush();
  return out;
}

/// Two runs of the same steps that must agree bit for bit: every loss and g, then theta (after
/// the runs' flush) equal, and different from `init` (they trained).
template <class PolicyA, class PolicyB>
void check_identical_runs(const std::vector<StepResult>& ra, const std::vector<StepResult>& rb, const PolicyA& a,
                          const PolicyB& b, const ParameterStore<float>& init) {
  REQUIRE(ra.size() == rb.size());
  for (std::size_t s = 0; s < ra.size(); ++s) {
    CAPTURE(s);
    CHECK(ra[s].loss_plus == rb[s].loss_plus);
    CHECK(ra[s].loss_minus == rb[s].loss_minus);
    CHECK(ra[s].projected_grad == rb[s].projected_grad);
  }
  ParameterStore<float> ta(init.model_layout()), tb(init.model_layout());
  a.store_to(ta);
  b.store_to(tb);
  CHECK(max_abs_diff(ta, tb) == 0.0);
  CHECK(max_abs_diff(ta, init) > 0.0);
}

}  // namespace

TEST_CASE("fp32 codec: same g and theta as the all-resident policy, streamed or partly resident") {
  if (!gpu_or_skip("fp32 equivalence")) return;
  TinyCudaStack model;
  const auto init = make_store(model, 7);
  const auto batch = make_batch(64, model.width, 3);
  const int steps = 6;

  // Reference: every group resident on the device.
#ifdef ZO2_TEST_HAVE_CUDA_RESIDENT
  CudaResident<float, float> ref_policy(init);
  double ref_eval = 0;
  const auto ref = run_steps(model, ref_policy, batch, steps, &ref_eval);
  ParameterStore<float> ref_theta(init.model_layout());
  ref_policy.synchronize();
  ref_policy.download(ref_theta);
  MESSAGE("reference: CudaResident<float, float>");
#else
  HostOffload<offload::Fp32Codec, float> ref_policy(init, OffloadOptions{.gpu_memory_budget = std::size_t{1} << 40});
  REQUIRE(ref_policy.streamed_blocks() == 0);
  double ref_eval = 0;
  const auto ref = run_steps(model, ref_policy, batch, steps, &ref_eval);
  ParameterStore<float> ref_theta(init.model_layout());
  ref_policy.store_to(ref_theta);
  MESSAGE("reference: HostOffload with every block resident (CudaResident not available)");
#endif

  using Policy = HostOffload<offload::Fp32Codec, float>;
  const auto plan = Policy::plan_for(ModelLayout::of(model), {});
  struct Setup {
    std::size_t budget_blocks;  // blocks' worth of budget above the minimum (0: no budget)
    bool one_copy, adds_slot;
    std::size_t resident, slots;  // what the plan must make of it
  };
  for (const Setup& c : {Setup{0, true, true, 0, 2}, Setup{2, true, false, 2, 2}, Setup{0, false, true, 0, 2},
                         Setup{2, true, true, 1, 3}}) {
    CAPTURE(c.budget_blocks);
    CAPTURE(c.one_copy);
    CAPTURE(c.adds_slot);
    OffloadOptions opt;
    opt.one_perturbed_copy = c.one_copy;
    opt.budget_adds_slot = c.adds_slot;
    if (c.budget_blocks) opt.gpu_memory_budget = plan.minimum_bytes + c.budget_blocks * plan.block_bytes;
    Policy policy(init, opt);
    REQUIRE(policy.resident_blocks() == c.resident);
    REQUIRE(policy.streamed_blocks() == model.blocks - c.resident);
    REQUIRE(policy.plan().slots == c.slots);
    double eval = 0;
    const auto got = run_steps(model, policy, batch, steps, &eval);
    for (int s = 0; s < steps; ++s) {
      CHECK(got[s].loss_plus == doctest::Approx(ref[s].loss_plus).epsilon(1e-9));
      CHECK(got[s].loss_minus == doctest::Approx(ref[s].loss_minus).epsilon(1e-9));
      CHECK(got[s].projected_grad == doctest::Approx(ref[s].projected_grad).epsilon(1e-6).scale(1e-3));
    }
    ParameterStore<float> theta(init.model_layout());
    policy.store_to(theta);
    CHECK(max_abs_diff(theta, ref_theta) <= 1e-6);
    CHECK(max_abs_diff(theta, init) > 1e-4);  // it did train
    CHECK(eval == doctest::Approx(ref_eval).epsilon(1e-9));
    // Each streamed block crossed once per step each way (no write-back on the first step,
    // which owes no update; flush writes back once more).
    CHECK(policy.bytes_offloaded() > 0);
  }
}

TEST_CASE("bf16 and int8 codecs: training runs and the loss falls") {
  if (!gpu_or_skip("bf16/int8 training")) return;
  TinyCudaStack model;
  model.width = 8;
  const auto init = make_store(model, 11);
  const auto batch = make_batch(64, model.width, 5);
  const auto train = [&](auto& policy) {
    TinyCudaStack m = model;
    m.stream = policy.stream();
    ZOConfig c = config();
    c.lr = 2e-3;
    c.weight_decay = 0;
    using P = std::remove_reference_t<decltype(policy)>;
    ZOOptimizer<TinyCudaStack, P> opt(m, policy, c);
    const double before = opt.evaluate(batch);
    for (int s = 0; s < 1500; ++s) opt.step(batch);
    const double after = opt.evaluate(batch);
    return std::pair{before, after};
  };
  HostOffload<offload::Bf16Codec, float> bf16(init);
  const auto [b0, b1] = train(bf16);
  MESSAGE("bf16 loss " << b0 << " -> " << b1);
  CHECK(b1 < 0.8 * b0);
  CHECK(std::isfinite(b1));
  HostOffload<offload::Int8RowCodec, float> int8(init);
  const auto [i0, i1] = train(int8);
  MESSAGE("int8 loss " << i0 << " -> " << i1);
  CHECK(i1 < 0.9 * i0);
  HostOffload<offload::Bf16Codec, bfloat16> bf16_out(init);  // forward in bf16 is not this model's; just run a step
  StepNoise noise{1, 0, 1e-3, nullptr};
  auto p = bf16_out.prepare(GroupIndex{1}, noise);
  bf16_out.synchronize();
  CHECK(p.plus.data() != nullptr);
}

TEST_CASE("one perturbed copy gives the same steps as two, in less memory (bf16 and int8)") {
  if (!gpu_or_skip("one perturbed copy")) return;
  TinyCudaStack model;
  model.width = 8;
  const auto init = make_store(model, 17);
  const auto batch = make_batch(64, model.width, 9);
  const auto compare = [&](auto tag) {
    using Policy = HostOffload<decltype(tag), float>;
    OffloadOptions two;
    two.one_perturbed_copy = false;
    Policy a(init), b(init, two);
    CHECK(a.shares_perturbed_copy());
    CHECK_FALSE(b.shares_perturbed_copy());
    check_identical_runs(run_steps(model, a, batch, 5), run_steps(model, b, batch, 5), a, b, init);
    // The saving: one block's perturbed copy and the prologue's.
    const ModelLayout ml = ModelLayout::of(model);
    const std::size_t saved = b.plan().fixed_bytes - a.plan().fixed_bytes;
    CHECK(saved >= (ml.layout(ml.block(0)).total_elements() + ml.layout(ml.prologue()).total_elements()) * sizeof(float));
    // materialize() of a streamed block other than the one being visited is refused.
    StepNoise noise{1, 9, 1e-3, nullptr};
    a.prepare(GroupIndex{1}, noise);
    CHECK_THROWS_AS(a.materialize(GroupIndex{2}, noise, Side::kMinus), Error);
    a.synchronize();
  };
  SUBCASE("bf16") { compare(offload::Bf16Codec{}); }
  SUBCASE("int8") { compare(offload::Int8RowCodec{}); }
}

TEST_CASE("the packed bf16 codec gives the bf16 codec's steps bit for bit, in fewer bytes") {
  if (!gpu_or_skip("packed bf16")) return;
  TinyCudaStack model;
  model.width = 8;
  const auto init = make_store(model, 23);
  const auto batch = make_batch(64, model.width, 13);
  HostOffload<offload::Bf16Codec, float> plain(init);
  HostOffload<offload::Bf16PackedCodec, float> packed(init);
  check_identical_runs(run_steps(model, plain, batch, 6), run_steps(model, packed, batch, 6), plain, packed, init);
  CHECK(packed.escape_overflow() == 0);
  CHECK(plain.escape_overflow() == 0);
  const ModelLayout ml = ModelLayout::of(model);
  MESSAGE("block bytes: bf16 " << plain.group_encoded_bytes(ml.block(0)) << ", packed "
                               << packed.group_encoded_bytes(ml.block(0)));
}

TEST_CASE("a NaN loss: the step is skipped and counted, the streamed weights stay as they were") {
  if (!gpu_or_skip("NaN loss")) return;
  TinyCudaStack model;
  const auto init = make_store(model, 23);
  const auto good = make_batch(64, model.width, 3);
  auto bad = make_batch(64, model.width, 4);
  const std::vector<float> nan_targets(64, std::numeric_limits<float>::quiet_NaN());
  ZO2_CUDA_CHECK(cudaMemcpy(bad.y.data(), nan_targets.data(), nan_targets.size() * sizeof(float), cudaMemcpyHostToDevice));
  using Policy = HostOffload<offload::Bf16Codec, float>;
  Policy policy(init);
  REQUIRE(policy.streamed_blocks() == model.blocks);
  TinyCudaStack m = model;
  m.stream = policy.stream();
  ZOOptimizer<TinyCudaStack, Policy> opt(m, policy, config());
  CHECK_FALSE(opt.step(good).skipped);
  opt.flush();
  ParameterStore<float> before(init.model_layout()), after(init.model_layout());
  policy.store_to(before);
  const auto r = opt.step(bad);
  CHECK(r.skipped);
  CHECK_FALSE(std::isfinite(r.loss_plus));
  CHECK(opt.state().skipped_steps == 1);
  CHECK_FALSE(opt.has_pending_update());
  opt.flush();
  policy.store_to(after);
  CHECK(max_abs_diff(before, after) == 0.0);
  // and the run goes on
  const auto next = opt.step(good);
  CHECK_FALSE(next.skipped);
  CHECK(std::isfinite(next.loss_plus));
}

TEST_CASE("every prefetch depth uploads each streamed block once per step (no eviction before use)") {
  if (!gpu_or_skip("prefetch depth")) return;
  TinyCudaStack model;
  model.blocks = 8;
  const auto init = make_store(model, 31);
  const auto batch = make_batch(64, model.width, 5);
  using Policy = HostOffload<offload::Bf16Codec, float>;
  for (std::size_t depth = 1; depth <= 4; ++depth) {
    CAPTURE(depth);
    Policy policy(init, OffloadOptions{.slots = depth + 1, .budget_adds_slot = false, .prefetch_depth = depth});
    REQUIRE(policy.streamed_blocks() == model.blocks);
    TinyCudaStack m = model;
    m.stream = policy.stream();
    ZOOptimizer<TinyCudaStack, Policy> opt(m, policy, config());
    opt.step(batch);
    policy.synchronize();
    policy.reset_traffic();
    const int steps = 3;
    for (int t = 0; t < steps; ++t) opt.step(batch);
    policy.synchronize();
    // The traffic counts the encoded bytes copied (block_bytes() is the slot's size, rounded up
    // to the arena's alignment). Prefetch wraps around into the next step: allow the blocks the
    // last step prefetched.
    const std::size_t block = policy.group_encoded_bytes(GroupIndex{1});
    const std::size_t per_step = model.blocks * block;
    CHECK(policy.bytes_uploaded() >= steps * per_step - depth * block);
    CHECK(policy.bytes_uploaded() <= steps * per_step + depth * block);
  }
}

TEST_CASE("a 2-slot run stays within its computed device memory bound") {
  if (!gpu_or_skip("memory bound")) return;
  TinyCudaStack model;
  model.blocks = 8;
  model.bulk = std::size_t{1} << 20;  // 4 MiB of fp32 per block
  const auto init = make_store(model, 13);
  const auto batch = make_batch(64, model.width, 7);
  using Policy = HostOffload<offload::Fp32Codec, float>;
  {  // warm-up: loads every kernel's module, which takes device memory once
    Policy warm(init);
    run_steps(model, warm, batch, 2);
  }
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());
  std::size_t free0 = 0, total = 0, low = SIZE_MAX;
  ZO2_CUDA_CHECK(cudaMemGetInfo(&free0, &total));
  {
    Policy policy(init);
    TinyCudaStack m = model;
    m.stream = policy.stream();
    ZOOptimizer<TinyCudaStack, Policy> opt(m, policy, config());
    for (int s = 0; s < 4; ++s) {
      opt.step(batch);
      std::size_t f = 0;
      ZO2_CUDA_CHECK(cudaMemGetInfo(&f, &total));
      low = std::min(low, f);
    }
    const auto& plan = policy.plan();
    CHECK(plan.slots == 2);
    CHECK(plan.resident_blocks == 0);
    // the model's activations: three buffers of 64 x 16 floats, and its loss word (2 MiB each at most)
    const std::size_t model_bound = 4 * (std::size_t{2} << 20);
    const std::size_t used = free0 - low;
    MESSAGE("device memory used " << used << " bytes; plan bound " << plan.device_bound_bytes << " + model "
                                  << model_bound << "; all blocks would be "
                                  << model.blocks * plan.block_bytes);
    CHECK(used <= plan.device_bound_bytes + model_bound);
    CHECK(plan.device_bound_bytes < model.blocks * plan.block_bytes);  // streaming is what saves memory
  }
}

TEST_CASE("the upload of block i+1 overlaps the compute of block i") {
  if (!gpu_or_skip("overlap")) return;
  TinyCudaStack model;
  model.blocks = 6;
  model.bulk = std::size_t{4} << 20;  // 16 MiB of fp32 per block
  model.spin_ns = 150'000;            // two forwards: ~0.3 ms, about the time of a 16 MiB copy
  const auto init = make_store(model, 17);
  const auto batch = make_batch(32, model.width, 9);
  using Policy = HostOffload<offload::Fp32Codec, float>;
  OffloadOptions opt;
  opt.record_timeline = true;
  Policy policy(init, opt);
  TinyCudaStack m = model;
  m.stream = policy.stream();
  ZOOptimizer<TinyCudaStack, Policy> zo(m, policy, config());
  zo.step(batch);
  zo.step(batch);
  policy.restart_timeline();
  zo.step(batch);  // owes step 1's update: uploads, fused kernels and write-backs all run
  policy.end_timeline_visit();
  const auto visits = policy.timeline().read();
  std::printf("%s", Timeline::format(visits).c_str());
  REQUIRE(visits.size() == model.blocks + 2);
  int overlapping = 0;
  for (std::size_t i = 1; i + 1 < model.blocks + 1; ++i) {  // visits 1..N are the blocks
    const auto& cur = visits[i];
    const auto& next = visits[i + 1];
    CAPTURE(i);
    REQUIRE(!std::isnan(next.upload_start));
    CHECK(!std::isnan(cur.offload_start));  // the updated block was written back
    const float overlap = std::min(cur.compute_end, next.upload_end) - std::max(cur.compute_start, next.upload_start);
    const float upload = next.upload_end - next.upload_start;
    const float compute = cur.compute_end - cur.compute_start;
    MESSAGE("block " << i - 1 << ": compute " << compute << " ms, next upload " << upload << " ms, overlap " << overlap
                     << " ms");
    // prefetched: the next block's upload starts before this block's compute is over
    CHECK(next.upload_start < cur.compute_end);
    if (overlap > 0.3f * std::min(upload, compute)) ++overlapping;
  }
  CHECK(overlapping >= static_cast<int>(model.blocks) - 2);  // all pairs but at most one
}

TEST_CASE("eval mode gives the loss at theta, uploads only") {
  if (!gpu_or_skip("eval")) return;
  TinyCudaStack model;
  const auto init = make_store(model, 19);
  const auto batch = make_batch(64, model.width, 11);
  using Policy = HostOffload<offload::Bf16Codec, float>;
  Policy policy(init);
  TinyCudaStack m = model;
  m.stream = policy.stream();
  ZOOptimizer<TinyCudaStack, Policy> zo(m, policy, config());
  for (int s = 0; s < 3; ++s) zo.step(batch);
  zo.flush();
  ParameterStore<float> before(init.model_layout());
  policy.store_to(before);
  policy.reset_traffic();
  const double loss = zo.evaluate(batch);
  CHECK(policy.bytes_offloaded() == 0);
  CHECK(policy.bytes_uploaded() > 0);
  ParameterStore<float> after(init.model_layout());
  policy.store_to(after);
  CHECK(before == after);
  // The same theta through a fresh fp32 offload (theta is exactly representable: bf16 values).
  HostOffload<offload::Fp32Codec, float> fresh(before);
  TinyCudaStack m2 = model;
  m2.stream = fresh.stream();
  ZOOptimizer<TinyCudaStack, HostOffload<offload::Fp32Codec, float>> zo2(m2, fresh, config());
  CHECK(zo2.evaluate(batch) == doctest::Approx(loss).epsilon(1e-12));
  // and the loss at theta lies between the perturbed ones' range of a step taken from it
  const auto r = zo.step(batch);
  CHECK(std::fabs(loss - 0.5 * (r.loss_plus + r.loss_minus)) < 1e-2 * std::max(1.0, loss));
}

TEST_CASE("configuration errors name the field and the numbers") {
  if (!gpu_or_skip("config errors")) return;
  TinyCudaStack model;
  const auto ml = ModelLayout::of(model);
  using Policy = HostOffload<offload::Fp16Codec, float>;
  CHECK_THROWS_WITH_AS(Policy(ml, OffloadOptions{.slots = 1}), doctest::Contains("slots"), ConfigError);
  CHECK_THROWS_WITH_AS(Policy(ml, OffloadOptions{.slots = 3, .prefetch_depth = 3}), doctest::Contains("prefetch_depth"),
                       ConfigError);
  CHECK_THROWS_WITH_AS(Policy(ml, OffloadOptions{.gpu_memory_budget = 1000}), doctest::Contains("at least"), ConfigError);
  const auto plan = Policy::plan_for(ml, {});
  Policy all(ml, OffloadOptions{.gpu_memory_budget = plan.fixed_bytes + model.blocks * plan.block_bytes});
  CHECK(all.streamed_blocks() == 0);
  CHECK(all.plan().host_pinned_bytes == 0);
  // A model far larger than the device: the message says what budget would fit.
  TinyCudaStack huge = model;
  huge.bulk = std::size_t{1} << 30;  // 4 GiB per fp32 block (2 GiB in fp16)
  std::size_t free_b = 0, total_b = 0;
  ZO2_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  huge.blocks = total_b / (std::size_t{2} << 30) + 4;  // 2 GiB fp16 blocks: more than this device holds
  const auto hplan = Policy::plan_for(ModelLayout::of(huge), {});
  OffloadOptions too_much;
  too_much.gpu_memory_budget = hplan.minimum_bytes + (total_b / hplan.block_bytes + 1) * hplan.block_bytes;
  CHECK_THROWS_WITH_AS(Policy(ModelLayout::of(huge), too_much), doctest::Contains("would fit"), OutOfMemory);
}
