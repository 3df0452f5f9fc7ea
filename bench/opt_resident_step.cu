// bench/opt_resident_step.cu -- the resident MeZO step on the GPU (ZOOptimizer + OPTCudaModel +
// zcuda::CudaResident) on OPT-shaped configs, the reference protocol: batch 1, seq 2048, random
// tokens, random weights (N(0, 0.02)-like, LayerNorm weights near 1), bf16 and fp16.
//
// Prints JSON lines:
//   {"kind":"gemm_rate", ...}   a large bf16 cuBLASLt GEMM, measured here: the floor's rate
//   {"kind":"pair_gemm", ...}   a block's +/- GEMMs as two calls vs one batch-2 call
//   {"kind":"step", ...}        per config and dtype: median step time over >= 10 timed steps
//                               (CUDA events, after warm-up), tokens/s, the floor
//                               4 * params * tokens / gemm rate, ratio to it, the PyTorch
//                               reference (MeZO on GPU, fp16), peak GPU memory, host RSS
//
// Usage: opt_resident_step [--models 125m,1.3b,6.7b,13b] [--dtypes bf16,fp16] [--steps 10]
//                          [--warmup 3] [--seq 2048] [--deadline 240]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.hpp"

#include <zo2/backend/cuda/attention.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/cuda/opt_cuda_model.cuh>
#include <zo2/models/opt/layout.hpp>
#include <zo2/models/opt/loader.hpp>
#include <zo2/offload/cuda_resident.cuh>
#include <zo2/optim/zo_optimizer.hpp>

using namespace zo2;
namespace zcuda = zo2::cuda;
using zo2_bench::JsonLine;

namespace {

__device__ __forceinline__ std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// p[i] = center + uniform(-half_width, half_width), a pure function of (seed, i).
template <class T>
__global__ void fill_uniform(T* p, std::size_t n, std::uint64_t seed, float center, float half_width) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::uint64_t r = mix64(seed * 0x100000001b3ull + i);
    const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = zcuda::st_from_f32<T>(center + half_width * (2.0f * u - 1.0f));
  }
}

template <class T>
void fill(T* p, std::size_t n, std::uint64_t seed, float center, float half_width, cudaStream_t s) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 132 * 16));
  fill_uniform<T><<<blocks, 256, 0, s>>>(p, n, seed, center, half_width);
  ZO2_CUDA_CHECK_LAUNCH("fill_uniform");
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) if (!item.empty()) out.push_back(item);
  return out;
}

std::string json_safe(std::string s) {
  for (char& c : s)
    if (c == '"' || c == '\\' || c == '\n') c = '\'';
  return s;
}

double median_ms(std::vector<float> v) {
  std::vector<double> d(v.begin(), v.end());
  return zo2_bench::median(d);
}

/// Times `fn` (enqueueing work on `s`) with events: median of `reps` after `warmup`.
template <class F>
double time_ms(cudaStream_t s, int warmup, int reps, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  zcuda::Event a(true), b(true);
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    a.record(s);
    fn();
    b.record(s);
    b.synchronize();
    t.push_back(b.elapsed_ms_since(a));
  }
  return median_ms(t);
}

double gemm_rate_tflops(cudaStream_t s) {
  const std::int64_t n = 8192;
  // Several operand sets so repeated runs do not measure one buffer's cache residency.
  constexpr int kSets = 3;
  std::vector<zcuda::DeviceBuffer<bfloat16>> x, w, y;
  for (int i = 0; i < kSets; ++i) {
    x.emplace_back(n * n), w.emplace_back(n * n), y.emplace_back(n * n);
    fill(x[i].data(), n * n, 100 + i, 0.0f, 1.0f, s);
    fill(w[i].data(), n * n, 200 + i, 0.0f, 1.0f, s);
  }
  zcuda::Gemm gemm;
  int k = 0;
  const double ms = time_ms(s, 3, 12, [&] {
    gemm.linear<bfloat16>(x[k % kSets].data(), w[k % kSets].data(), nullptr, y[k % kSets].data(), n, n, n, s);
    ++k;
  });
  const double tflops = 2.0 * n * n * n / (ms * 1e-3) / 1e12;
  JsonLine().add("kind", "gemm_rate").add("dtype", "bf16").add("m", n).add("n", n).add("k", n).add("ms", ms)
      .add("tflops", tflops).print();
  return tflops;
}

/// A block's GEMMs for the +/- passes: two calls vs one strided-batched call of 2.
template <class T>
void pair_gemm(const opt::OPTConfig& c, std::int64_t tokens, cudaStream_t s) {
  zcuda::Gemm gemm;
  struct Shape {
    const char* name;
    std::int64_t n, k;
  };
  const Shape shapes[] = {{"qkv_proj", c.hidden_size, c.hidden_size}, {"out_proj", c.hidden_size, c.hidden_size},
                          {"fc1", c.ffn_dim, c.hidden_size}, {"fc2", c.hidden_size, c.ffn_dim}};
  double sum_two = 0, sum_batched = 0;
  for (const Shape& sh : shapes) {
    const std::int64_t xs = tokens * sh.k, ws = sh.n * sh.k, ys = tokens * sh.n;
    zcuda::DeviceBuffer<T> x(2 * xs), w(2 * ws), b(2 * sh.n), y(2 * ys);
    fill(x.data(), x.size(), 1, 0.0f, 1.0f, s);
    fill(w.data(), w.size(), 2, 0.0f, 0.03f, s);
    fill(b.data(), b.size(), 3, 0.0f, 0.1f, s);
    const bool relu = std::string(sh.name) == "fc1";
    const double two = time_ms(s, 3, 20, [&] {
      gemm.linear<T>(x.data(), w.data(), b.data(), y.data(), tokens, sh.n, sh.k, s, relu);
      gemm.linear<T>(x.data() + xs, w.data() + ws, b.data() + sh.n, y.data() + ys, tokens, sh.n, sh.k, s, relu);
    });
    zcuda::GemmArgs<T, T> a;
    a.m = tokens, a.n = sh.n, a.k = sh.k;
    a.x = x.data(), a.ldx = sh.k, a.stride_x = xs;
    a.w = w.data(), a.ldw = sh.k, a.stride_w = ws;
    a.y = y.data(), a.ldy = sh.n, a.stride_y = ys;
    a.bias = b.data(), a.stride_bias = sh.n, a.relu = relu;
    a.batch = 2;
    const double batched = time_ms(s, 3, 20, [&] { gemm.run(a, s); });
    const double count = std::string(sh.name) == "qkv_proj" ? 3.0 : 1.0;  // Q, K, V
    sum_two += count * two;
    sum_batched += count * batched;
    const double flops = 2.0 * 2.0 * tokens * sh.n * sh.k;
    JsonLine().add("kind", "pair_gemm").add("dtype", zcuda::type_name<T>()).add("hidden", c.hidden_size)
        .add("gemm", sh.name).add("m", tokens).add("n", sh.n).add("k", sh.k).add("two_calls_ms", two)
        .add("batched_ms", batched).add("speedup", two / batched).add("two_calls_tflops", flops / (two * 1e-3) / 1e12)
        .add("batched_tflops", flops / (batched * 1e-3) / 1e12).print();
  }
  JsonLine().add("kind", "pair_gemm_block").add("dtype", zcuda::type_name<T>()).add("hidden", c.hidden_size)
      .add("two_calls_ms", sum_two).add("batched_ms", sum_batched).add("speedup", sum_two / sum_batched).print();
}

/// The attention of one layer (one sequence) alone: its share of a forward.
template <class T>
void attention_timing(const opt::OPTConfig& c, std::int64_t seq, zcuda::Gemm& gemm, cudaStream_t s) {
  const std::int64_t hidden = c.hidden_size, n = seq * hidden;
  zcuda::DeviceBuffer<T> q(n), k(n), v(n), ctx(n);
  fill(q.data(), n, 11, 0.0f, 1.7f, s);
  fill(k.data(), n, 12, 0.0f, 1.7f, s);
  fill(v.data(), n, 13, 0.0f, 1.7f, s);
  zcuda::DeviceBuffer<std::uint8_t> mask(seq);
  ZO2_CUDA_CHECK(cudaMemsetAsync(mask.data(), 1, seq, s));
  zcuda::AttentionScratch<T> scratch;
  const double ms = time_ms(s, 3, 20, [&] {
    zcuda::causal_attention<T>(gemm, q.data(), k.data(), v.data(), mask.data(), ctx.data(), 1, seq,
                               c.num_attention_heads, c.head_dim(), scratch, s);
  });
  const double causal_flops = 2.0 * 2.0 * seq * seq * hidden / 2.0;  // QK^T and PV, lower triangle
  JsonLine().add("kind", "attention").add("dtype", zcuda::type_name<T>()).add("hidden", hidden)
      .add("heads", c.num_attention_heads).add("seq", seq).add("ms_per_layer", ms)
      .add("ms_per_forward", ms * static_cast<double>(c.num_hidden_layers))
      .add("causal_tflops", causal_flops / (ms * 1e-3) / 1e12).print();
}

double pytorch_reference_s(const std::string& model) {
  if (model == "125m") return 0.040;
  if (model == "1.3b") return 0.077;
  if (model == "6.7b") return 0.323;
  return -1;
}

template <class T>
void bench_step(const std::string& name, int seq, int warmup, int steps, double gemm_tflops) {
  const opt::OPTConfig config = opt::OPTConfig::preset("opt-" + name);
  const std::size_t params = opt::parameter_count(config);
  const double setup_start = zo2_bench::now_seconds();
  zcuda::Stream stream;

  // The host store only seeds the policy's device master; the weights are then drawn on the
  // device (drawing 13B values on one host core would take minutes).
  std::unique_ptr<zcuda::CudaResident<T, T>> policy;
  {
    ParameterStore<T> store(opt::model_layout(config));
    policy = std::make_unique<zcuda::CudaResident<T, T>>(store, stream.get());
  }
  const ModelLayout& ml = policy->model_layout();
  std::uint64_t seed = 1;
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    ParamView<T> view = policy->master(GroupIndex{g});
    const ParamLayout& layout = view.layout();
    for (std::size_t t = 0; t < layout.num_tensors(); ++t) {
      const TensorSpec& spec = layout.spec(t);
      const bool ln_weight = spec.name.find("layer_norm.weight") != std::string::npos;
      const bool bias = spec.name.size() > 5 && spec.name.compare(spec.name.size() - 5, 5, ".bias") == 0;
      // uniform(-a, a) with a = 0.02 * sqrt(3): std 0.02, OPT's init.
      fill(view.tensor(t), spec.numel(), seed++, ln_weight ? 1.0f : 0.0f, ln_weight ? 0.05f : bias ? 0.01f : 0.0346f,
           stream.get());
    }
  }

  opt::OPTCudaModel<T> model(config, stream.get());
  struct HostBatch {
    std::size_t batch = 1, seq = 0;
    std::vector<std::int32_t> input_ids, attention_mask, labels;
  } host;
  host.seq = static_cast<std::size_t>(seq);
  std::uint64_t state = 12345;
  for (int s = 0; s < seq; ++s) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    host.input_ids.push_back(static_cast<std::int32_t>(3 + (state >> 33) % static_cast<std::uint64_t>(config.vocab_size - 3)));
  }
  host.labels = host.input_ids;
  const auto batch = model.make_batch(host);

  ZOConfig zc;
  zc.lr = 1e-6, zc.eps = 1e-3, zc.seed = 7;
  ZOOptimizer<opt::OPTCudaModel<T>, zcuda::CudaResident<T, T>> optimizer(model, *policy, zc);
  policy->synchronize();
  const double setup_s = zo2_bench::now_seconds() - setup_start;

  StepResult last;
  for (int i = 0; i < warmup; ++i) last = optimizer.step(batch);
  zcuda::Event a(true), b(true);
  std::vector<double> times, walls;
  std::size_t peak_used = 0, free_b = 0, total_b = 0;
  int finite = 0;
  for (int i = 0; i < steps; ++i) {
    const double w0 = zo2_bench::now_seconds();
    a.record(stream.get());
    last = optimizer.step(batch);
    b.record(stream.get());
    b.synchronize();
    walls.push_back(zo2_bench::now_seconds() - w0);
    times.push_back(b.elapsed_ms_since(a) * 1e-3);
    finite += last.skipped ? 0 : 1;
    ZO2_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    peak_used = std::max(peak_used, total_b - free_b);
  }
  // One plain forward (evaluate: flush + unperturbed pass), for the step's breakdown.
  std::vector<double> fwd;
  for (int i = 0; i < 3; ++i) {
    const double w0 = zo2_bench::now_seconds();
    optimizer.evaluate(batch);
    fwd.push_back(zo2_bench::now_seconds() - w0);
  }
  const double step_s = zo2_bench::median(times);
  const double tokens = static_cast<double>(seq);
  const double floor_s = 4.0 * static_cast<double>(params) * tokens / (gemm_tflops * 1e12);
  const double ref = pytorch_reference_s(name);
  JsonLine line;
  line.add("kind", "step").add("config", "opt-" + name).add("dtype", zcuda::type_name<T>()).add("params", params)
      .add("batch", 1).add("seq", seq).add("warmup_steps", warmup).add("timed_steps", steps)
      .add("step_s_median", step_s).add("step_s_min", *std::min_element(times.begin(), times.end()))
      .add("step_s_max", *std::max_element(times.begin(), times.end()))
      .add("wall_s_median", zo2_bench::median(walls)).add("forward_s_median", zo2_bench::median(fwd))
      .add("tokens_per_s", tokens / step_s).add("floor_s", floor_s).add("ratio_to_floor", step_s / floor_s)
      .add("gemm_tflops_measured", gemm_tflops);
  if (ref > 0) line.add("pytorch_mezo_gpu_s", ref).add("speedup_vs_pytorch", ref / step_s);
  else line.add("pytorch_mezo_gpu_s", "null");
  line.add("peak_gpu_used_bytes", peak_used).add("policy_device_bytes", policy->device_bytes())
      .add("host_peak_rss_bytes", zo2_bench::peak_host_rss_bytes()).add("finite_steps", finite)
      .add("last_loss_plus", last.loss_plus).add("last_loss_minus", last.loss_minus).add("setup_s", setup_s)
      .add("gemm_plans", model.gemm().cached_plans());
  line.print();
}

}  // namespace

int main(int argc, char** argv) {
  std::string models = "125m,1.3b,6.7b,13b", dtypes = "bf16,fp16";
  int steps = 10, warmup = 3, seq = 2048;
  double deadline = 240;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--models") models = v;
    else if (k == "--dtypes") dtypes = v;
    else if (k == "--steps") steps = std::max(1, std::atoi(v.c_str()));
    else if (k == "--warmup") warmup = std::atoi(v.c_str());
    else if (k == "--seq") seq = std::atoi(v.c_str());
    else if (k == "--deadline") deadline = std::atof(v.c_str());
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    if (!zcuda::device_available()) {
      std::printf("SKIPPED: no CUDA device\n");
      return 0;
    }
    const double start = zo2_bench::now_seconds();
    cudaDeviceProp prop{};
    ZO2_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    JsonLine().add("kind", "device").add("name", std::string(prop.name)).add("sms", prop.multiProcessorCount)
        .add("memory_bytes", prop.totalGlobalMem).print();
    double rate = 0;
    {
      zcuda::Stream s;
      rate = gemm_rate_tflops(s.get());
      for (const std::string& m : split(models)) {
        const opt::OPTConfig c = opt::OPTConfig::preset("opt-" + m);
        pair_gemm<bfloat16>(c, seq, s.get());
        zcuda::Gemm gemm;
        attention_timing<bfloat16>(c, seq, gemm, s.get());
      }
    }
    for (const std::string& m : split(models)) {
      for (const std::string& d : split(dtypes)) {
        if (zo2_bench::now_seconds() - start > deadline) {
          JsonLine().add("kind", "skipped").add("config", "opt-" + m).add("dtype", d).add("why", "deadline").print();
          continue;
        }
        try {
          if (d == "bf16") bench_step<bfloat16>(m, seq, warmup, steps, rate);
          else if (d == "fp16") bench_step<float16>(m, seq, warmup, steps, rate);
          else if (d == "fp32") bench_step<float>(m, seq, warmup, steps, rate);
        } catch (const std::exception& e) {
          JsonLine().add("kind", "error").add("config", "opt-" + m).add("dtype", d).add("what", json_safe(e.what())).print();
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "opt_resident_step: %s\n", e.what());
    return 1;
  }
  return 0;
}
