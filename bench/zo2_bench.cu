// bench/zo2_bench.cu -- zo2's benchmark against the PyTorch reference and the hardware's floors:
// the MeZO-SGD step of OPT-shaped models (ZOOptimizer + OPTCudaModel) and of the LLaMA family
// (LlamaCudaModel: Llama, Qwen2, Qwen3, Mistral presets) with the weights resident on the GPU
// (CudaResident) or offloaded to pinned host memory (HostOffload<Codec>), one JSON line per
// configuration. `zo2_bench --help` for the options, bench/bench_config.hpp for the
// named sets, docs/benchmarks.md for the protocol and the results.
//
// What a configuration line holds (all times in seconds, memory in bytes):
//   step_s_{median,p10,p90,min,max}  CUDA-event time of each timed step on the compute stream,
//                                    after the warm-up steps (wall_s_median: host clock)
//   tokens_per_s                     batch * seq / median
//   gpu_zo2_peak_bytes               peak of the bytes zo2 itself holds in cudaMalloc
//                                    allocations (counted by wrapping cudaMalloc/cudaFree at
//                                    link time; the policy's masters and scratch, the model's
//                                    activations and workspace, the batch), from the start of
//                                    the configuration's setup to its last step
//   gpu_policy_bytes                 what the policy holds (CudaResident::device_bytes,
//                                    HostOffload's arena)
//   gpu_device_used_peak_bytes       cudaMemGetInfo total - free, the largest after any timed
//                                    step (adds the CUDA context, cuBLAS's own memory and
//                                    whatever else runs on the GPU); gpu_nvml_used_peak_bytes
//                                    the same from NVML where the driver library loads
//   host_peak_rss_bytes              VmHWM over the configuration (reset at its start)
//   compute_floor_s                  2 * forwards * params * tokens / the bf16 GEMM rate measured
//                                    at start (forwards: 2 per query, zo-cons 5)
//   pcie_floor_s                     offload: max(bytes up / concurrent H2D bandwidth, bytes
//                                    down / concurrent D2H bandwidth), both measured at start
//                                    with the two directions running together, as the step
//                                    runs them; pcie_floor_h2d_only_s: bytes up / H2D alone
//                                    (the design notes' "one copy of the weights over PCIe");
//                                    0 for resident. With deferred write-back (fewer bytes down
//                                    than up), the copies down run at the concurrent rates, the
//                                    uploads beside them too, and the rest of the uploads at the
//                                    H2D-alone rate (pcie_floor_seconds)
//   writeback_every                  offload: K as asked (0: chosen as zo2-opt does, from the
//                                    link measured at start and the last warm-up step timed at
//                                    K = 1: block_upload_ms, block_compute_ms, block_pass_ms,
//                                    block_period_ms, the medians of a streamed visit);
//                                    writeback_every_used: the K;
//                                    updates_replayed_per_step: the update-only passes that
//                                    replayed what host copies lacked (about blocks (K - 1) / 2)
//   ratio_to_floor                   step_s_median / max(compute_floor_s, pcie_floor_s)
//   gemm_sustained_tflops            the same GEMM after 2 s of back-to-back products: the GPU's
//                                    power limit lowers the clocks of any long GEMM-bound run
//                                    (an H200 at 700 W: ~1.7 GHz instead of 1.98), and the step
//                                    runs there; compute_floor_sustained_s and
//                                    ratio_to_sustained_floor use it (informational: the
//                                    issue's floor is the burst rate above)
//   reference_*                      the PyTorch reference (ZO2) on an H100, fp16, batch 1,
//                                    seq 2048, where it was measured: reference_s is the one
//                                    matching the policy (MeZO on GPU for resident, ZO2
//                                    offloaded for offload), speedup_vs_reference = it / ours
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "bench_config.hpp"
#include "bench_cuda.cuh"
#include "bench_util.hpp"

#include <zo2/backend/cpu/perturber.hpp>
#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/models/llama/config.hpp>
#include <zo2/models/llama/cuda/llama_cuda_model.cuh>
#include <zo2/models/llama/layout.hpp>
#include <zo2/models/lm_head.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/cuda/opt_cuda_model.cuh>
#include <zo2/models/opt/layout.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/cuda_resident.cuh>
#include <zo2/offload/host_offload.cuh>
#include <zo2/offload/writeback_trial.hpp>
#include <zo2/optim/zo_optimizer.hpp>

// ---- counting zo2's device allocations -------------------------------------------------------
// The link wraps cudaMalloc/cudaFree (-Wl,--wrap, bench/CMakeLists.txt): every call made from
// this program's code -- zo2's headers are compiled into it -- goes through here; cuBLAS's and
// the runtime's own allocations do not.
namespace alloc_count {
struct Counter {
  std::mutex mutex;
  std::unordered_map<void*, std::size_t> sizes;
  std::size_t live = 0, peak = 0, calls = 0;
};
inline Counter& counter() {
  static Counter c;
  return c;
}
#ifdef ZO2_BENCH_WRAP_CUDA_MALLOC
constexpr bool kEnabled = true;
#else
constexpr bool kEnabled = false;
#endif
/// Starts a new peak at what is live now.
inline void reset_peak() {
  std::lock_guard<std::mutex> lock(counter().mutex);
  counter().peak = counter().live;
}
inline std::size_t peak() {
  std::lock_guard<std::mutex> lock(counter().mutex);
  return counter().peak;
}
inline std::size_t live() {
  std::lock_guard<std::mutex> lock(counter().mutex);
  return counter().live;
}
}  // namespace alloc_count

#ifdef ZO2_BENCH_WRAP_CUDA_MALLOC
extern "C" cudaError_t __real_cudaMalloc(void** ptr, size_t size);
extern "C" cudaError_t __real_cudaFree(void* ptr);
extern "C" cudaError_t __wrap_cudaMalloc(void** ptr, size_t size) {
  const cudaError_t s = __real_cudaMalloc(ptr, size);
  if (s == cudaSuccess && ptr && *ptr) {
    auto& c = alloc_count::counter();
    std::lock_guard<std::mutex> lock(c.mutex);
    c.sizes[*ptr] = size;
    c.live += size;
    c.peak = std::max(c.peak, c.live);
    ++c.calls;
  }
  return s;
}
extern "C" cudaError_t __wrap_cudaFree(void* ptr) {
  if (ptr) {
    auto& c = alloc_count::counter();
    std::lock_guard<std::mutex> lock(c.mutex);
    if (auto it = c.sizes.find(ptr); it != c.sizes.end()) {
      c.live -= it->second;
      c.sizes.erase(it);
    }
  }
  return __real_cudaFree(ptr);
}
#endif

namespace {

using namespace zo2;
using namespace zo2_bench;

/// What every configuration line repeats about the run (so each line stands alone).
struct Env {
  std::string device;
  int device_index = 0;
  GemmRate gemm;
  Bandwidth bw;
  std::unique_ptr<DeviceMemoryProbe> probe;
  double start = 0;
  zcuda::FlashKernel flash = zcuda::FlashKernel::kAuto;  // resolved: kMmaSync or kWgmma
  int gemm_autotune = 0;
};

/// The model's options for this run: the flash kernel --flash chose, --gemm-autotune.
/// ModelOptions: opt::OPTCudaOptions or llama::LlamaCudaOptions (the same two fields).
template <class ModelOptions>
ModelOptions model_options(const Env& env) {
  ModelOptions mo;
  mo.flash_kernel = env.flash;
  mo.gemm_autotune = env.gemm_autotune;
  return mo;
}

/// A host batch as OPTCudaModel::make_batch and LlamaCudaModel::make_batch read it (no
/// attention mask: every token visible; LLaMA positions 0..seq-1).
struct HostBatch {
  std::size_t batch = 1, seq = 0;
  std::vector<std::int32_t> input_ids, attention_mask, labels;
};

HostBatch random_batch(const RunConfig& c, std::int64_t vocab) {
  HostBatch h;
  h.batch = static_cast<std::size_t>(c.batch), h.seq = static_cast<std::size_t>(c.seq);
  std::uint64_t state = 12345;
  for (std::size_t i = 0; i < h.batch * h.seq; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    h.input_ids.push_back(static_cast<std::int32_t>(3 + (state >> 33) % static_cast<std::uint64_t>(vocab - 3)));
  }
  h.labels = h.input_ids;
  return h;
}

ModelLayout opt_model_layout(const opt::OPTConfig& c) {
  return ModelLayout(opt::prologue_layout(c), opt::block_layout(c), static_cast<std::size_t>(c.num_hidden_layers),
                     opt::epilogue_layout(c));
}

/// What the run functions need of a model family (bench_config.hpp's model_family picks one):
/// the config of a preset name, the CUDA layer stack in precision T, its options, its layout.
struct OptFamily {
  using Config = opt::OPTConfig;
  template <class T>
  using Model = opt::OPTCudaModel<T>;
  using ModelOptions = opt::OPTCudaOptions;
  static ModelLayout layout(const Config& c) { return opt_model_layout(c); }
};

struct LlamaFamily {
  using Config = llama::LlamaConfig;
  template <class T>
  using Model = llama::LlamaCudaModel<T>;
  using ModelOptions = llama::LlamaCudaOptions;
  static ModelLayout layout(const Config& c) {
    return ModelLayout(llama::prologue_layout(c), llama::block_layout(c), static_cast<std::size_t>(c.num_hidden_layers),
                       llama::epilogue_layout(c));
  }
};

unsigned host_threads() { return std::max(1u, std::min(32u, std::thread::hardware_concurrency())); }

/// Runs fn(begin, end) over [0, n) on all host threads.
template <class F>
void parallel_for(std::size_t n, F&& fn) {
  const unsigned t = host_threads();
  if (n < (std::size_t{1} << 20) || t == 1) return fn(std::size_t{0}, n);
  std::vector<std::thread> pool;
  const std::size_t chunk = (n + t - 1) / t;
  for (unsigned i = 0; i < t; ++i) {
    const std::size_t b = i * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  for (auto& th : pool) th.join();
}

/// A group's parameters as floats (padding zero), OPT-like values (init_range), on the host.
std::vector<float> host_group_values(const ParamLayout& layout, std::uint64_t seed) {
  std::vector<float> flat(layout.total_elements(), 0.0f);
  for (std::size_t t = 0; t < layout.num_tensors(); ++t) {
    const auto [center, half] = init_range(layout.spec(t).name);
    float* p = flat.data() + layout.offset(t);
    const std::uint64_t s = seed * 1000 + t;
    parallel_for(layout.spec(t).numel(), [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) p[i] = uniform_value(s, i, center, half);
    });
  }
  return flat;
}

/// Fills every tensor of a device view with OPT-like values, on the device.
template <class T>
void device_fill_group(ParamView<T> view, std::uint64_t seed, cudaStream_t s) {
  const ParamLayout& layout = view.layout();
  for (std::size_t t = 0; t < layout.num_tensors(); ++t) {
    const auto [center, half] = init_range(layout.spec(t).name);
    fill_uniform(view.tensor(t), layout.spec(t).numel(), seed * 1000 + t, center, half, s);
  }
}

/// What a configuration measured, policy-independent parts.
struct Measured {
  std::vector<double> step_s, wall_s;
  int finite = 0;
  StepResult last;
  std::size_t device_used_peak = 0, nvml_used_peak = 0;
};

/// Warm-up, then the timed steps: events on `stream` around each optimizer.step. `before_last`
/// runs before the last timed step (the timeline's restart).
template <class Optimizer, class Batch, class BeforeLast>
Measured timed_steps(Optimizer& optimizer, const Batch& batch, cudaStream_t stream, const RunConfig& c, Env& env,
                     BeforeLast&& before_last) {
  Measured m;
  for (int i = 0; i < c.warmup; ++i) m.last = optimizer.step(batch);
  zcuda::Event a(true), b(true);
  for (int i = 0; i < c.steps; ++i) {
    if (i == c.steps - 1) before_last();
    const double w0 = now_seconds();
    a.record(stream);
    m.last = optimizer.step(batch);
    b.record(stream);
    b.synchronize();
    m.wall_s.push_back(now_seconds() - w0);
    m.step_s.push_back(b.elapsed_ms_since(a) * 1e-3);
    m.finite += m.last.skipped ? 0 : 1;
    m.device_used_peak = std::max(m.device_used_peak, env.probe->cuda_used());
    m.nvml_used_peak = std::max(m.nvml_used_peak, env.probe->nvml_used());
  }
  return m;
}

/// The policy-dependent numbers of a configuration line.
struct PolicyNumbers {
  std::size_t policy_bytes = 0;
  double h2d_bytes_per_step = 0, d2h_bytes_per_step = 0;
  std::size_t host_pinned_bytes = 0, block_bytes = 0, streamed_blocks = 0, resident_blocks = 0, slots = 0,
              perturbed_copies = 2;
  std::uint64_t escape_overflow = 0;  // packed codec: escapes flushed to zero for want of room
  unsigned writeback_every = 1;       // the plan's K (deferred write-back)
  offload::BlockTiming block_timing{};  // writeback_every 0: the trial's K = 1 step
  std::string writeback_trial;          // writeback_every 0: each K tried and its median step
  double updates_replayed_per_step = 0;
  unsigned state_value_bytes = 4;     // the rule state's bytes per value (4 fp32, 2 bf16)
  bool prologue_scratch_shared = false;  // the blocks reuse the prologue's perturbed copy
};

/// The PCIe floor of a step moving `up` bytes host-to-device and `down` back (see the file
/// comment): every block written back (down >= up) keeps both directions busy the whole step;
/// with deferred write-back the uploads run at the concurrent rate only beside the copies down.
double pcie_floor_seconds(double up, double down, const Bandwidth& bw) {
  if (down <= 0) return up / (bw.h2d * 1e9);
  if (down >= up) return std::max(up / (bw.bidir_h2d * 1e9), down / (bw.bidir_d2h * 1e9));
  const double overlap = down / (bw.bidir_d2h * 1e9);
  const double rest = up - overlap * bw.bidir_h2d * 1e9;
  return overlap + std::max(rest, 0.0) / (bw.h2d * 1e9);
}

struct Baseline {
  std::size_t device_used = 0, nvml_used = 0, zo2_live = 0;
  double t0 = 0;
};

Baseline begin_config(Env& env) {
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());
  reset_peak_host_rss();
  alloc_count::reset_peak();
  Baseline b;
  b.device_used = env.probe->cuda_used();
  b.nvml_used = env.probe->nvml_used();
  b.zo2_live = alloc_count::live();
  b.t0 = now_seconds();
  return b;
}

void print_config_line(const RunConfig& c, const Env& env, const Baseline& base, double setup_s, const Measured& m,
                       const PolicyNumbers& p, std::size_t gemm_plans) {
  const double params = static_cast<double>(model_params(c.model));
  const double tokens = static_cast<double>(c.batch) * c.seq;
  const double med = median(m.step_s);
  const double compute_floor = forwards_per_step(c) * 2.0 * params * tokens / (env.gemm.tflops * 1e12);
  double pcie_floor = 0, pcie_h2d_only = 0;
  if (p.h2d_bytes_per_step > 0 || p.d2h_bytes_per_step > 0) {
    pcie_floor = pcie_floor_seconds(p.h2d_bytes_per_step, p.d2h_bytes_per_step, env.bw);
    pcie_h2d_only = p.h2d_bytes_per_step / (env.bw.h2d * 1e9);
  }
  const double floor_s = std::max(compute_floor, pcie_floor);
  const Reference ref = reference_for(c);
  const double ref_s = c.policy == "resident" ? ref.mezo_gpu_s : ref.zo2_offload_s;

  JsonLine line;
  line.add("kind", "config").add("bench", "zo2_bench").add("device", env.device);
  add_config_fields(line, c);
  line.add("flash_kernel", zcuda::flash_kernel_name(env.flash)).add("gemm_autotune", env.gemm_autotune);
  line.add("params", static_cast<std::uint64_t>(params)).add("tokens_per_step", static_cast<std::uint64_t>(tokens))
      .add("warmup_steps", c.warmup).add("timed_steps", c.steps).add("finite_steps", m.finite)
      .add("step_s_median", med).add("step_s_p10", quantile(m.step_s, 0.1)).add("step_s_p90", quantile(m.step_s, 0.9))
      .add("step_s_min", quantile(m.step_s, 0.0)).add("step_s_max", quantile(m.step_s, 1.0))
      .add("wall_s_median", median(m.wall_s)).add("tokens_per_s", tokens / med);
  if (alloc_count::kEnabled) line.add("gpu_zo2_peak_bytes", alloc_count::peak() - base.zo2_live);
  else line.raw("gpu_zo2_peak_bytes", "null");
  line.add("gpu_policy_bytes", p.policy_bytes).add("gpu_device_used_peak_bytes", m.device_used_peak)
      .add("gpu_device_used_before_bytes", base.device_used);
  if (env.probe->nvml_available()) line.add("gpu_nvml_used_peak_bytes", m.nvml_used_peak);
  else line.raw("gpu_nvml_used_peak_bytes", "null");
  line.add("host_peak_rss_bytes", peak_host_rss_bytes()).add("host_rss_bytes", host_rss_bytes());
  if (c.policy == "offload")
    line.add("host_pinned_bytes", p.host_pinned_bytes).add("block_bytes", p.block_bytes)
        .add("streamed_blocks", p.streamed_blocks).add("resident_blocks", p.resident_blocks).add("slots", p.slots)
        .add("perturbed_copies", p.perturbed_copies).add("escape_overflow", p.escape_overflow)
        .add("writeback_every_used", p.writeback_every).add("updates_replayed_per_step", p.updates_replayed_per_step)
        .add("block_upload_ms", p.block_timing.upload_ms).add("block_compute_ms", p.block_timing.compute_ms)
        .add("block_pass_ms", p.block_timing.pass_ms).add("block_period_ms", p.block_timing.period_ms)
        .add("writeback_trial", p.writeback_trial)
        .add("rule_state", p.state_value_bytes == 2 ? "bf16" : "fp32")
        .add("prologue_scratch_shared", p.prologue_scratch_shared);
  line.add("h2d_bytes_per_step", p.h2d_bytes_per_step).add("d2h_bytes_per_step", p.d2h_bytes_per_step)
      .add("gemm_tflops", env.gemm.tflops).add("pinned_h2d_GBps", env.bw.h2d)
      .add("pinned_bidir_h2d_GBps", env.bw.bidir_h2d).add("pinned_bidir_d2h_GBps", env.bw.bidir_d2h)
      .add("compute_floor_s", compute_floor).add("pcie_floor_s", pcie_floor).add("pcie_floor_h2d_only_s", pcie_h2d_only)
      .add("floor_s", floor_s).add("floor", pcie_floor > compute_floor ? "pcie" : "compute")
      .add("ratio_to_floor", med / floor_s);
  if (env.gemm.sustained_tflops > 0) {
    const double sustained_floor = forwards_per_step(c) * 2.0 * params * tokens / (env.gemm.sustained_tflops * 1e12);
    line.add("gemm_sustained_tflops", env.gemm.sustained_tflops).add("compute_floor_sustained_s", sustained_floor)
        .add("ratio_to_sustained_floor", med / std::max(sustained_floor, pcie_floor));
  }
  if (ref_s > 0) line.add("reference_s", ref_s).add("speedup_vs_reference", ref_s / med);
  else line.raw("reference_s", "null");
  if (ref.mezo_gpu_s > 0)
    line.add("reference_mezo_gpu_s", ref.mezo_gpu_s).add("reference_zo2_offload_s", ref.zo2_offload_s)
        .add("reference_zo2_gpu_bytes", ref.zo2_gpu_bytes).add("reference_dtype", "fp16");
  line.add("loss_plus", m.last.loss_plus).add("loss_minus", m.last.loss_minus).add("setup_s", setup_s)
      .add("gemm_plans", gemm_plans).add("elapsed_s", now_seconds() - env.start);
  line.print();
}

/// Where a resident step's time goes: the fused update + perturb passes over every group alone,
/// and the two forwards alone (on the master, no perturbation), each timed with CUDA events
/// (median of 3). Printed as a {"kind":"breakdown"} line after the configuration's line.
template <class Model, class Policy, class DeviceBatch>
void resident_breakdown(const RunConfig& c, Env& env, const Model& model, Policy& policy, const DeviceBatch& batch,
                        cudaStream_t stream) {
  const ModelLayout& ml = policy.model_layout();
  const PendingUpdate owed{1000, 1e-3, 1e-9, 0.0};
  const StepNoise noise{7, 1001, 1e-3, &owed};
  typename Model::Activation plus, minus, next;
  typename Model::Workspace ws;
  const auto forwards = [&] {
    const auto pro = policy.master(ml.prologue());
    double loss = 0;
    for (auto* h : {&plus, &minus}) {
      model.prologue(pro, batch, *h, ws);
      for (std::size_t i = 0; i < ml.num_blocks(); ++i) {
        model.forward_block(i, policy.master(ml.block(i)), *h, next, ws);
        std::swap(*h, next);
      }
      loss += model.epilogue(policy.master(ml.epilogue()), pro, *h, batch, ws);
    }
    return loss;
  };
  const auto perturb = [&] {
    for (std::size_t g = 0; g < ml.num_groups(); ++g) policy.prepare(GroupIndex{g}, noise);
  };
  // Median of 3 after one warm-up run.
  const double perturb_s = time_ms(stream, 1, 3, perturb) * 1e-3;
  const double forward_s = time_ms(stream, 1, 3, forwards) * 1e-3;
  JsonLine line;
  line.add("kind", "breakdown").add("bench", "zo2_bench").add("device", env.device);
  add_config_fields(line, c);
  line.add("perturb_all_groups_s", perturb_s).add("two_forwards_s", forward_s).add("sum_s", perturb_s + forward_s);
  line.print();
}

/// The optimizer a configuration runs (its rule and query count; lr, eps, seed set by the caller).
ZOConfig zo_config(const RunConfig& c) {
  ZOConfig zc;
  zc.method = parse_method(c.optimizer, "--optimizer");
  zc.queries = static_cast<unsigned>(c.queries);
  return zc;
}

template <class Family, class T>
void run_resident(const RunConfig& c, Env& env) {
  using Model = typename Family::template Model<T>;
  const Baseline base = begin_config(env);
  const typename Family::Config config = Family::Config::preset(c.model);
  zcuda::Stream stream;
  // The master is drawn on the device: no host copy of the weights, no upload.
  zcuda::CudaResident<T, T> policy(Family::layout(config), stream.get());
  const ModelLayout& ml = policy.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) device_fill_group(policy.master(GroupIndex{g}), 1 + g, stream.get());
  Model model(config, stream.get(), model_options<typename Family::ModelOptions>(env));
  const auto batch = model.make_batch(random_batch(c, config.vocab_size));
  ZOConfig zc = zo_config(c);
  zc.lr = 1e-6, zc.eps = 1e-3, zc.seed = 7;
  ZOOptimizer<Model, zcuda::CudaResident<T, T>> optimizer(model, policy, zc);
  policy.synchronize();
  const double setup_s = now_seconds() - base.t0;

  const Measured m = timed_steps(optimizer, batch, stream.get(), c, env, [] {});
  PolicyNumbers p;
  p.policy_bytes = policy.device_bytes();
  print_config_line(c, env, base, setup_s, m, p, model.gemm().cached_plans());
  resident_breakdown(c, env, model, policy, batch, stream.get());
}

std::string timeline_json(const std::vector<zcuda::GroupVisitTimes>& visits) {
  // [group, kind, resident, upload_start, upload_end, compute_start, compute_end, offload_start,
  //  offload_end, pass_end] per visit, ms from the recording's start, null where the phase did not
  //  happen (pass_end: where a perturbing visit's pass ended and the model's forwards began).
  const auto num = [](float v) {
    if (std::isnan(v)) return std::string("null");
    char b[32];
    std::snprintf(b, sizeof b, "%.4f", v);
    return std::string(b);
  };
  std::string s = "[";
  for (std::size_t i = 0; i < visits.size(); ++i) {
    const auto& v = visits[i];
    s += (i ? ",[" : "[") + std::to_string(v.group) + ",\"" + v.kind + "\"," + (v.resident ? "true" : "false") + "," +
         num(v.upload_start) + "," + num(v.upload_end) + "," + num(v.compute_start) + "," + num(v.compute_end) + "," +
         num(v.offload_start) + "," + num(v.offload_end) + "," + num(v.pass_end) + "]";
  }
  return s + "]";
}

template <class Family, class Codec, class T>
void run_offload(const RunConfig& c, const Options& o, Env& env) {
  using Model = typename Family::template Model<T>;
  const Baseline base = begin_config(env);
  const typename Family::Config config = Family::Config::preset(c.model);
  using Policy = zcuda::HostOffload<Codec, T>;
  zcuda::OffloadOptions opts;
  // writeback_every 0: K = 1 until the last warm-up step is timed, then K as zo2-opt chooses it.
  const bool choose_k = c.writeback_every == 0;
  opts.record_timeline = o.timeline || choose_k;
  opts.gpu_memory_budget = o.gpu_budget;
  opts.slots = planned_slots(c, o);
  opts.prefetch_depth = std::min(o.prefetch, opts.slots - 1);
  opts.one_perturbed_copy = !o.two_copies;
  opts.rule_state_bf16 = o.state_bf16;
  opts.rule_state_slots = rule_state_slots(ZOOptimizer<Model, Policy>::rule_of(zo_config(c)));
  opts.writeback_every = choose_k ? 1u : static_cast<unsigned>(c.writeback_every);
  opts.link = {env.bw.h2d, env.bw.bidir_h2d};
  // An untied LM head: the blocks reuse the token embedding's perturbed copy (as zo2-opt does).
  opts.prologue_scratch_shared = !models::ties_lm_head(config);
  Policy policy(Family::layout(config), opts);
  {
    // Values drawn on all host threads and encoded once per group kind; every block gets the
    // same encoded bytes (encoding billions of values on one core would take minutes, and the
    // step's time does not depend on which values the blocks hold).
    const ModelLayout& ml = policy.model_layout();
    for (const GroupIndex g : {ml.prologue(), ml.epilogue(), ml.block(0)}) {
      const std::vector<float> flat = host_group_values(ml.layout(g), 1 + g.value);
      typename offload::GroupCodecOf<Codec>::type codec(ml.layout(g));
      std::vector<unsigned char> encoded(codec.bytes());
      codec.encode_group(flat, encoded);
      if (g.value != ml.block(0).value) {
        policy.set_group_encoded(g, encoded);
        continue;
      }
      policy.set_group_encoded(g, encoded);  // block 0 (resident or streamed), then the rest in parallel
      // Blocks are independent host buffers (or device masters for resident blocks); a fresh
      // policy holds none of them in a slot, so these calls touch disjoint memory.
      const std::size_t n = ml.num_blocks();
      std::vector<std::thread> pool;
      const unsigned t = std::min<unsigned>(host_threads(), 8);
      for (unsigned k = 0; k < t; ++k)
        pool.emplace_back([&, k] {
          for (std::size_t i = 1 + k; i < n; i += t) policy.set_group_encoded(ml.block(i), encoded);
        });
      for (auto& th : pool) th.join();
    }
  }
  Model model(config, policy.stream(), model_options<typename Family::ModelOptions>(env));
  const auto batch = model.make_batch(random_batch(c, config.vocab_size));
  ZOConfig zc = zo_config(c);
  zc.lr = 1e-7, zc.eps = 1e-3, zc.seed = 5;
  ZOOptimizer<Model, Policy> optimizer(model, policy, zc);
  policy.synchronize();
  const double setup_s = now_seconds() - base.t0;

  // Warm-up here, so the traffic counters hold the timed steps' alone. --writeback-every 0: then
  // K is chosen as zo2-opt chooses it, by timing steps at K = 1, 2, 4, 8 (offload::WritebackTrial);
  // the trial's first step (K = 1) is recorded for its visit times.
  offload::BlockTiming block_timing{};
  std::string trial_summary;
  for (int i = 0; i < (choose_k ? std::max(c.warmup, 1) : c.warmup); ++i) optimizer.step(batch);
  if (choose_k) {
    offload::WritebackTrial trial;
    for (bool first = true; !trial.done(); first = false) {
      trial.apply_to(policy);
      if (first) policy.restart_timeline();
      policy.synchronize();
      const double t0 = now_seconds();
      optimizer.step(batch);
      policy.synchronize();
      trial.record(now_seconds() - t0);
      if (first) {
        policy.end_timeline_visit();
        block_timing = policy.block_timing();
        if (!o.timeline) policy.timeline().stop();
      }
    }
    trial.apply_to(policy);
    for (unsigned j = 1; j < policy.writeback_every(); ++j) optimizer.step(batch);  // into the stagger's steady state
    trial_summary = trial.summary();
  }
  policy.synchronize();
  policy.reset_traffic();
  RunConfig timed = c;
  timed.warmup = 0;
  const Measured m = timed_steps(optimizer, batch, policy.stream(), timed, env, [&] {
    if (o.timeline) policy.restart_timeline();
  });
  PolicyNumbers p;
  p.h2d_bytes_per_step = static_cast<double>(policy.bytes_uploaded()) / c.steps;
  p.d2h_bytes_per_step = static_cast<double>(policy.bytes_offloaded()) / c.steps;
  p.policy_bytes = policy.plan().device_bytes();  // arena, rule state, tables
  p.host_pinned_bytes = policy.plan().host_pinned_bytes;
  p.escape_overflow = policy.escape_overflow();
  p.block_bytes = policy.block_bytes();
  p.streamed_blocks = policy.streamed_blocks();
  p.resident_blocks = policy.resident_blocks();
  p.slots = policy.plan().slots;
  p.perturbed_copies = policy.shares_perturbed_copy() ? 1 : 2;
  p.writeback_every = policy.writeback_every();
  p.block_timing = block_timing;
  p.writeback_trial = trial_summary;
  p.state_value_bytes = policy.plan().state_value_bytes;
  p.prologue_scratch_shared = policy.shares_prologue_scratch();
  p.updates_replayed_per_step = static_cast<double>(policy.updates_replayed()) / c.steps;
  print_config_line(c, env, base, setup_s, m, p, model.gemm().cached_plans());

  if (o.timeline) {
    policy.end_timeline_visit();
    const auto visits = policy.timeline().read();
    std::fprintf(stderr, "timeline of the last timed step, %s offload codec %s dtype %s (ms from its start):\n%s\n",
                 c.model.c_str(), c.codec.c_str(), c.dtype.c_str(), zcuda::Timeline::format(visits).c_str());
    JsonLine line;
    line.add("kind", "timeline").add("bench", "zo2_bench").add("device", env.device);
    add_config_fields(line, c);
    line.add("columns", "group,kind,resident,upload_start,upload_end,compute_start,compute_end,offload_start,offload_end,pass_end")
        .raw("visits", timeline_json(visits));
    line.print();
  }
}

template <class Family, class T>
void run_offload_codec(const RunConfig& c, const Options& o, Env& env) {
  if (c.codec == "bf16") run_offload<Family, offload::Bf16Codec, T>(c, o, env);
  else if (c.codec == "bf16p") run_offload<Family, offload::Bf16PackedCodec, T>(c, o, env);
  else if (c.codec == "fp16") run_offload<Family, offload::Fp16Codec, T>(c, o, env);
  else if (c.codec == "int8") run_offload<Family, offload::Int8RowCodec, T>(c, o, env);
  else if (c.codec == "fp32") run_offload<Family, offload::Fp32Codec, T>(c, o, env);
  else throw Error("unknown codec " + c.codec);
}

template <class Family>
void run_family(const RunConfig& c, const Options& o, Env& env) {
  if (c.policy == "resident") {
    if (c.dtype == "bf16") run_resident<Family, bfloat16>(c, env);
    else run_resident<Family, float16>(c, env);
  } else {
    if (c.dtype == "bf16") run_offload_codec<Family, bfloat16>(c, o, env);
    else run_offload_codec<Family, float16>(c, o, env);
  }
}

void run_config(const RunConfig& c, const Options& o, Env& env) {
  if (model_family(c.model) == ModelFamily::kLlama) run_family<LlamaFamily>(c, o, env);
  else run_family<OptFamily>(c, o, env);
}

/// The fused flash kernels (mma.sync; wgmma where the build and device have it) against the
/// materialized path (cuBLAS batched GEMMs + masked softmax) at OPT's attention shapes, seq 2048,
/// batch 1, bf16, no padding mask (as a resident step passes an all-ones mask); median of 20
/// after 5 warm-ups; one {"kind":"attention"} line per shape.
void attention_rates(const Env& env) {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  zcuda::Gemm gemm;
  zcuda::AttentionScratch<bfloat16> scratch;
  const std::int64_t seq = 2048;
  const std::int64_t shapes[4][3] = {{768, 12, 64}, {2048, 32, 64}, {4096, 32, 128}, {5120, 40, 128}};
  const bool have_wgmma = zcuda::flash_wgmma_available();
  for (const auto& shape : shapes) {
    const std::int64_t hidden = shape[0], heads = shape[1], hd = shape[2];
    const auto n = static_cast<std::size_t>(seq * hidden);
    std::vector<bfloat16> host(n);
    zcuda::DeviceBuffer<bfloat16> q(n), k(n), v(n), out(n);
    for (auto* buf : {&q, &k, &v}) {
      for (auto& x : host) x = to_bfloat16(normal(rng));
      zcuda::copy_to_device(buf->data(), host.data(), n, nullptr);
    }
    const auto flash = [&](zcuda::FlashKernel kernel) {
      return time_ms(nullptr, 5, 20, [&] {
        zcuda::flash_causal_attention<bfloat16>(q.data(), k.data(), v.data(), nullptr, out.data(), 1, seq, heads, hd,
                                                nullptr, kernel);
      });
    };
    const double mma_ms = flash(zcuda::FlashKernel::kMmaSync);
    const double wgmma_ms = have_wgmma ? flash(zcuda::FlashKernel::kWgmma) : 0.0;
    const double materialized_ms = time_ms(nullptr, 5, 20, [&] {
      zcuda::causal_attention<bfloat16>(gemm, q.data(), k.data(), v.data(), nullptr, out.data(), 1, seq, heads, hd,
                                        scratch, nullptr);
    });
    const double flash_ms = have_wgmma ? wgmma_ms : mma_ms;
    const double causal_flop = 4.0 * heads * hd * (static_cast<double>(seq) * (seq + 1) / 2);
    JsonLine line;
    line.add("kind", "attention").add("bench", "zo2_bench").add("device", env.device).add("dtype", "bf16")
        .add("hidden", hidden).add("heads", heads).add("head_dim", hd).add("seq", seq).add("mask", "none")
        .add("flash_kernel", zcuda::flash_kernel_name(have_wgmma ? zcuda::FlashKernel::kWgmma
                                                                 : zcuda::FlashKernel::kMmaSync))
        .add("flash_ms", flash_ms)
        .add("mma_sync_ms", mma_ms).add("mma_sync_tflops", causal_flop / mma_ms * 1e-9);
    if (have_wgmma) line.add("wgmma_ms", wgmma_ms).add("wgmma_tflops", causal_flop / wgmma_ms * 1e-9);
    line.add("materialized_ms", materialized_ms).add("flash_tflops", causal_flop / flash_ms * 1e-9)
        .add("materialized_tflops", causal_flop / materialized_ms * 1e-9).add("speedup", materialized_ms / flash_ms)
        .print();
  }
}

/// ns per element of the host-side alternative to write-back: cpu::Perturber<bfloat16>::update
/// (Philox z and rounding word, Box-Muller, update, stochastic rounding), one thread and all.
void host_update_rate(const Env& env) {
  const unsigned threads = host_threads();
  const std::size_t n = std::size_t{1} << 22;
  std::vector<std::vector<bfloat16>> data(threads, std::vector<bfloat16>(n, to_bfloat16(0.02f)));
  const UpdateCoeffs u{1e-6, 1.0, 0.0};
  double t0 = now_seconds();
  cpu::Perturber<bfloat16>::update(data[0].data(), n, NoiseId{1, 2, 3}, u);
  const double single = (now_seconds() - t0) / n * 1e9;
  t0 = now_seconds();
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { cpu::Perturber<bfloat16>::update(data[t].data(), n, NoiseId{1, 2, 3 + t}, u); });
  for (auto& th : pool) th.join();
  const double all = (now_seconds() - t0) / (static_cast<double>(n) * threads) * 1e9;
  JsonLine().add("kind", "host_update").add("bench", "zo2_bench").add("device", env.device)
      .add("host_threads", threads).add("ns_per_elem_1thread", single).add("ns_per_elem_all_threads", all)
      .add("s_per_step_opt6.7b_all_threads", 6.658e9 * all * 1e-9)
      .add("bf16_copy_s_per_step_opt6.7b_h2d", 6.658e9 * 2 / (env.bw.h2d * 1e9)).print();
}

std::string today() {
  const std::time_t t = std::time(nullptr);
  char b[32];
  std::strftime(b, sizeof b, "%Y-%m-%d", std::gmtime(&t));
  return b;
}

void print_planned(const Plan& plan, const Options& o) {
  for (const RunConfig& c : plan.configs) {
    JsonLine line;
    line.add("kind", "planned");
    add_config_fields(line, c);
    if (c.policy == "offload") line.add("slots", planned_slots(c, o));
    line.add("params", model_params(c.model)).add("warmup_steps", c.warmup).add("timed_steps", c.steps);
    // The estimate at H100-like rates (790 TFLOP/s, 48 GB/s concurrent H2D).
    line.add("estimate_s_h100", estimate_seconds(c, 790, 48)).print();
  }
  for (const Skipped& s : plan.skipped) {
    JsonLine line;
    line.add("kind", "skipped");
    add_config_fields(line, s.config);
    line.add("why", s.why).print();
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse_options(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "zo2_bench: %s\n", e.what());
    return 2;
  }
  if (o.help) {
    std::fputs(usage_text().c_str(), stdout);
    return 0;
  }
  Plan plan;
  try {
    plan = expand(o, host_available_bytes());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zo2_bench: %s\n", e.what());
    return 2;
  }
  if (o.list) {
    print_planned(plan, o);
    return 0;
  }

  int count = 0;
  const cudaError_t probe = cudaGetDeviceCount(&count);
  if (probe != cudaSuccess || count == 0) {
    std::fprintf(stderr,
                 "zo2_bench: no CUDA device (cudaGetDeviceCount: %s, %d devices); it measures the GPU engine and "
                 "needs an NVIDIA GPU. `zo2_bench --list` shows what it would run.\n",
                 probe == cudaSuccess ? "no error" : cudaGetErrorString(probe), count);
    return 3;
  }

  int failures = 0;
  try {
    Env env;
    env.start = now_seconds();
    ZO2_CUDA_CHECK(cudaGetDevice(&env.device_index));
    cudaDeviceProp prop{};
    ZO2_CUDA_CHECK(cudaGetDeviceProperties(&prop, env.device_index));
    env.device = prop.name;
    env.probe = std::make_unique<DeviceMemoryProbe>(env.device_index);
    const bool have_wgmma = zcuda::flash_wgmma_available();
    if (o.flash == "wgmma" && !have_wgmma)
      throw std::runtime_error("--flash wgmma: this build or device has no wgmma kernel (build for sm_90a)");
    env.flash = o.flash == "mma" || !have_wgmma ? zcuda::FlashKernel::kMmaSync : zcuda::FlashKernel::kWgmma;
    {
      zcuda::Stream s;
      env.gemm_autotune = o.gemm_autotune;
      env.gemm = measure_gemm_rate(s.get(), o.gemm_autotune, /*sustain_s=*/2.0);
    }
    env.bw = measure_pinned_bandwidth();
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    JsonLine().add("kind", "env").add("bench", "zo2_bench").add("device", env.device).add("date", today())
        .add("sms", prop.multiProcessorCount).add("gpu_memory_bytes", prop.totalGlobalMem)
        .add("cuda_driver", driver).add("cuda_runtime", runtime).add("gemm_n", env.gemm.n)
        .add("gemm_ms", env.gemm.ms).add("gemm_tflops", env.gemm.tflops)
        .add("gemm_sustained_tflops", env.gemm.sustained_tflops).add("pinned_h2d_GBps", env.bw.h2d)
        .add("pinned_d2h_GBps", env.bw.d2h).add("pinned_bidir_h2d_GBps", env.bw.bidir_h2d)
        .add("pinned_bidir_d2h_GBps", env.bw.bidir_d2h).add("host_memory_bytes", host_total_bytes())
        .add("host_available_bytes", host_available_bytes()).add("host_threads", std::thread::hardware_concurrency())
        .add("nvml", env.probe->nvml_available()).add("flash_kernel", zcuda::flash_kernel_name(env.flash))
        .add("gemm_autotune", env.gemm_autotune)
        .add("zo2_alloc_counting", alloc_count::kEnabled)
        .add("set", o.set.empty() ? std::string("explicit") : o.set).print();
    if (o.extras) {
      host_update_rate(env);
      attention_rates(env);
    }

    for (const Skipped& s : plan.skipped) {
      JsonLine line;
      line.add("kind", "skipped").add("bench", "zo2_bench").add("device", env.device);
      add_config_fields(line, s.config);
      line.add("why", s.why).print();
    }
    for (const RunConfig& c : plan.configs) {
      const double elapsed = now_seconds() - env.start;
      const double estimate = estimate_seconds(c, env.gemm.tflops, env.bw.bidir_h2d);
      if (o.deadline_s > 0 && elapsed + estimate > o.deadline_s) {
        JsonLine line;
        line.add("kind", "skipped").add("bench", "zo2_bench").add("device", env.device);
        add_config_fields(line, c);
        line.add("why", "deadline").add("elapsed_s", elapsed).add("estimate_s", estimate)
            .add("deadline_s", o.deadline_s).print();
        continue;
      }
      std::fprintf(stderr, "zo2_bench: %s %s codec %s dtype %s (estimate %.0f s, elapsed %.0f s)\n", c.model.c_str(),
                   c.policy.c_str(), c.codec.c_str(), c.dtype.c_str(), estimate, elapsed);
      try {
        run_config(c, o, env);
      } catch (const std::exception& e) {
        ++failures;
        JsonLine line;
        line.add("kind", "error").add("bench", "zo2_bench").add("device", env.device);
        add_config_fields(line, c);
        line.add("what", e.what()).print();
        cudaGetLastError();  // a sticky error stays; a recoverable one (out of memory) is cleared
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zo2_bench: %s\n", e.what());
    return 1;
  }
  return failures ? 1 : 0;
}
