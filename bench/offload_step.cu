// bench/offload_step.cu -- the offloaded MeZO step (HostOffload) on OPT-shaped configs, batch 1,
// seq 2048, per codec: step time, tokens/s, peak GPU memory, host RSS, the PCIe floor (bytes
// crossing per step / pinned bandwidth measured here) and the ratio; the timeline of one step.
// Also the host's Philox+update rate, the number behind "write-back, not host-side update".
//
// The forward is a compute proxy while the OPT CUDA model (models/opt/cuda/) is not available:
// per block and pass, the OPT block's GEMMs with their exact shapes in bf16 (q, k, v, out_proj,
// fc1, fc2, and the attention score and value products per head, no softmax/LayerNorm); the
// epilogue is the tied LM-head GEMM. Parameter layouts are OPT's (models/opt/layout.hpp), so the
// bytes moved and the fused update+perturb work are those of the real model.
//
// Usage: offload_step [--models 1.3b,6.7b,13b] [--codecs bf16,int8,fp32] [--steps 4]
//                     [--deadline SECONDS] [--seq 2048]
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <zo2/backend/cpu/perturber.hpp>
#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/layout.hpp>
#include <zo2/offload/host_offload.cuh>
#include <zo2/optim/zo_optimizer.hpp>

#if __has_include(<zo2/models/opt/cuda/opt_cuda_model.cuh>)
#include <zo2/models/opt/cuda/opt_cuda_model.cuh>
#define ZO2_BENCH_HAVE_OPT_CUDA 1
#endif

#include "bench_util.hpp"

using namespace zo2;
using namespace zo2::cuda;
using zo2_bench::JsonLine;

namespace {

__global__ void fill_bf16(bfloat16* p, std::size_t n, float v) {
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    p[i] = bfloat16{__bfloat16_as_ushort(__float2bfloat16(v * ((i % 7) - 3)))};
}
__global__ void sum_kernel(const bfloat16* p, std::size_t n, double* out) {
  __shared__ double part[256];
  double acc = 0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x * 64) acc += to_float(p[i]);
  part[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int k = 0; k < 256; ++k) s += part[k];
    *out = s * 1e-6;
  }
}

/// OPT-shaped compute proxy (see the header comment).
struct OptProxy {
  using value_type = bfloat16;
  struct Batch {};
  struct Activation {
    DeviceBuffer<bfloat16> h;
  };
  struct Workspace {};

  opt::OPTConfig c;
  long seq = 2048;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  // scratch shared by both passes (same stream: strictly ordered)
  bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *att = nullptr, *scores = nullptr, *ff = nullptr,
           *logits = nullptr;
  double* loss = nullptr;

  std::size_t num_blocks() const { return static_cast<std::size_t>(c.num_hidden_layers); }
  ParamLayout prologue_layout() const { return opt::prologue_layout(c); }
  ParamLayout block_layout() const { return opt::block_layout(c); }
  ParamLayout epilogue_layout() const { return opt::epilogue_layout(c); }

  // row-major Y[m, n] = X[m, k] W[n, k]^T
  void linear(const bfloat16* x, const bfloat16* w, bfloat16* y, long m, long n, long k) const {
    const float one = 1.0f, zero = 0.0f;
    ZO2_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, k, x, CUDA_R_16BF,
                                  k, &zero, y, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  void prologue(ParamView<const bfloat16>, const Batch&, Activation& out, Workspace&) const {
    out.h.reserve(static_cast<std::size_t>(seq * c.hidden_size));
    fill_bf16<<<1024, 256, 0, stream>>>(out.h.data(), out.h.size(), 0.01f);
  }
  void forward_block(std::size_t, ParamView<const bfloat16> p, const Activation& in, Activation& out, Workspace&) const {
    const long h = c.hidden_size, f = c.ffn_dim, heads = c.num_attention_heads, d = h / heads;
    const bfloat16* x = in.h.data();
    linear(x, p.tensor("self_attn.q_proj.weight"), q, seq, h, h);
    linear(x, p.tensor("self_attn.k_proj.weight"), k, seq, h, h);
    linear(x, p.tensor("self_attn.v_proj.weight"), v, seq, h, h);
    const float one = 1.0f, zero = 0.0f;
    // per head: S = Q_h K_h^T [seq, seq]; A_h = S V_h [seq, d]  (row-major, head stride d in a row)
    ZO2_CUBLAS_CHECK(cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, seq, seq, d, &one, k, CUDA_R_16BF, h,
                                                d, q, CUDA_R_16BF, h, d, &zero, scores, CUDA_R_16BF, seq, seq * seq,
                                                heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    ZO2_CUBLAS_CHECK(cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_N, CUBLAS_OP_N, d, seq, seq, &one, v, CUDA_R_16BF, h,
                                                d, scores, CUDA_R_16BF, seq, seq * seq, &zero, att, CUDA_R_16BF, h, d,
                                                heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    linear(att, p.tensor("self_attn.out_proj.weight"), q, seq, h, h);
    linear(q, p.tensor("fc1.weight"), ff, seq, f, h);
    linear(ff, p.tensor("fc2.weight"), k, seq, h, f);
    // the proxy keeps the activation bounded: the next block reads this block's input
    out.h.reserve(in.h.size());
    ZO2_CUDA_CHECK(cudaMemcpyAsync(out.h.data(), x, in.h.size() * sizeof(bfloat16), cudaMemcpyDeviceToDevice, stream));
  }
  double epilogue(ParamView<const bfloat16>, ParamView<const bfloat16> pro, const Activation& in, const Batch&,
                  Workspace&) const {
    // the tied LM head: logits [seq, vocab] = h [seq, proj] E^T
    linear(in.h.data(), pro.tensor("embed_tokens.weight"), logits, seq, c.vocab_size, c.word_embed_proj_dim);
    sum_kernel<<<1, 256, 0, stream>>>(logits, static_cast<std::size_t>(seq * c.vocab_size), loss);
    double l = 0;
    ZO2_CUDA_CHECK(cudaMemcpyAsync(&l, loss, sizeof l, cudaMemcpyDeviceToHost, stream));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream));
    return l;
  }
};

std::string json_safe(std::string s) {
  for (char& ch : s)
    if (ch == '"' || ch == '\\' || ch == '\n') ch = '\'';
  return s;
}

struct Bandwidth {
  double h2d = 0, d2h = 0, bidir_h2d = 0, bidir_d2h = 0;  // GB/s
};

Bandwidth measure_pinned_bandwidth() {
  const std::size_t bytes = std::size_t{512} << 20;
  PinnedBuffer<unsigned char> host_a(bytes), host_b(bytes);
  std::memset(host_a.data(), 1, bytes);
  std::memset(host_b.data(), 2, bytes);
  DeviceBuffer<unsigned char> dev_a(bytes), dev_b(bytes);
  Stream s1, s2;
  Event e0(true), e1(true), e2(true), e3(true);
  Bandwidth bw;
  const auto one_way = [&](cudaMemcpyKind kind) {
    double best = 0;
    for (int r = 0; r < 4; ++r) {
      e0.record(s1);
      if (kind == cudaMemcpyHostToDevice) ZO2_CUDA_CHECK(cudaMemcpyAsync(dev_a.data(), host_a.data(), bytes, kind, s1));
      else ZO2_CUDA_CHECK(cudaMemcpyAsync(host_a.data(), dev_a.data(), bytes, kind, s1));
      e1.record(s1);
      e1.synchronize();
      best = std::max(best, bytes / (e1.elapsed_ms_since(e0) * 1e-3) / 1e9);
    }
    return best;
  };
  bw.h2d = one_way(cudaMemcpyHostToDevice);
  bw.d2h = one_way(cudaMemcpyDeviceToHost);
  for (int r = 0; r < 4; ++r) {
    e0.record(s1);
    e0.wait_on(s2);
    e2.record(s2);
    ZO2_CUDA_CHECK(cudaMemcpyAsync(dev_a.data(), host_a.data(), bytes, cudaMemcpyHostToDevice, s1));
    ZO2_CUDA_CHECK(cudaMemcpyAsync(host_b.data(), dev_b.data(), bytes, cudaMemcpyDeviceToHost, s2));
    e1.record(s1);
    e3.record(s2);
    e1.synchronize();
    e3.synchronize();
    bw.bidir_h2d = std::max(bw.bidir_h2d, bytes / (e1.elapsed_ms_since(e0) * 1e-3) / 1e9);
    bw.bidir_d2h = std::max(bw.bidir_d2h, bytes / (e3.elapsed_ms_since(e2) * 1e-3) / 1e9);
  }
  return bw;
}

/// ns per element of the host-side alternative: cpu::Perturber<bfloat16>::update (Philox z,
/// Philox SR word, Box-Muller, update, SR), one thread and all threads.
std::pair<double, double> host_update_ns_per_elem(unsigned threads) {
  const std::size_t n = std::size_t{1} << 22;
  std::vector<std::vector<bfloat16>> data(threads, std::vector<bfloat16>(n, to_bfloat16(0.02f)));
  const UpdateCoeffs u{1e-6, 1.0, 0.0};
  double t0 = zo2_bench::now_seconds();
  cpu::Perturber<bfloat16>::update(data[0].data(), n, NoiseId{1, 2, 3}, u);
  const double single = (zo2_bench::now_seconds() - t0) / n * 1e9;
  t0 = zo2_bench::now_seconds();
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { cpu::Perturber<bfloat16>::update(data[t].data(), n, NoiseId{1, 2, 3 + t}, u); });
  for (auto& th : pool) th.join();
  const double all = (zo2_bench::now_seconds() - t0) / (static_cast<double>(n) * threads) * 1e9;
  return {single, all};
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t p = 0;
  while (p <= s.size()) {
    const std::size_t q = s.find(',', p);
    out.push_back(s.substr(p, q == std::string::npos ? std::string::npos : q - p));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  return out;
}

struct Options {
  std::vector<std::string> models{"1.3b", "6.7b"};
  std::vector<std::string> codecs{"bf16", "int8", "fp32"};
  int steps = 4;
  double deadline = 1e9;
  long seq = 2048;
  std::string timeline_for = "6.7b/bf16";
  std::string forward = "opt";  // opt: OPTCudaModel when available (falls back to the proxy); proxy
};

opt::OPTConfig preset(const std::string& name) {
  for (const auto& p : opt::OPTConfig::preset_names())
    if (p.find(name) != std::string::npos) return opt::OPTConfig::preset(p);
  throw Error("unknown model " + name);
}

template <class Codec>
void run_one(const std::string& model_name, const Options& o, const Bandwidth& bw, double host_ns_all,
             double start_time) {
  const opt::OPTConfig c = preset(model_name);
  OptProxy model;
  model.c = c;
  model.seq = o.seq;
  std::size_t free0 = 0, total = 0;
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());
  ZO2_CUDA_CHECK(cudaMemGetInfo(&free0, &total));

  using Policy = HostOffload<Codec, bfloat16>;
  OffloadOptions opts;
  opts.record_timeline = true;
  const double t_setup = zo2_bench::now_seconds();
  Policy policy(ModelLayout::of(model), opts);
  // Weights: one random encoded block copied into every block (encoding 13B elements on one
  // core would take minutes); prologue/epilogue from their own random floats.
  {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    const auto& ml = policy.model_layout();
    for (GroupIndex g : {ml.prologue(), ml.epilogue(), ml.block(0)}) {
      std::vector<float> flat(ml.layout(g).total_elements());
      for (auto& x : flat) x = nd(rng);
      offload::GroupCodec<Codec> codec(ml.layout(g));
      std::vector<unsigned char> enc(codec.bytes());
      codec.encode_group(flat, enc);
      if (g.value == 1)
        for (std::size_t i = 0; i < ml.num_blocks(); ++i) policy.set_group_encoded(ml.block(i), enc);
      else
        policy.set_group_encoded(g, enc);
    }
  }
  const double setup_s = zo2_bench::now_seconds() - t_setup;

  const auto measure = [&](auto& model, auto& batch, const char* forward) {
    ZOConfig cfg;
    cfg.lr = 1e-7;
    cfg.eps = 1e-3;
    cfg.seed = 5;
    using M = std::remove_reference_t<decltype(model)>;
    ZOOptimizer<M, Policy> zo(model, policy, cfg);
    zo.step(batch);
    zo.step(batch);  // warm: the second step owes an update, as every later one does
    std::vector<double> times;
    std::size_t low = free0;
    std::string timeline;
    for (int s = 0; s < o.steps; ++s) {
      if (s == o.steps - 1) policy.restart_timeline();
      policy.reset_traffic();
      const double t0 = zo2_bench::now_seconds();
      zo.step(batch);
      times.push_back(zo2_bench::now_seconds() - t0);
      std::size_t f = 0;
      ZO2_CUDA_CHECK(cudaMemGetInfo(&f, &total));
      low = std::min(low, f);
    }
    policy.end_timeline_visit();
    const auto visits = policy.timeline().read();
    const double step = zo2_bench::median(times);
    const double up = static_cast<double>(policy.bytes_uploaded()), down = static_cast<double>(policy.bytes_offloaded());
    const double floor_h2d = up / (bw.h2d * 1e9);
    const double floor_bidir = std::max(up / (bw.bidir_h2d * 1e9), down / (bw.bidir_d2h * 1e9));
    const double params = static_cast<double>(opt::parameter_count(c));
    JsonLine()
        .add("bench", "offload_step")
        .add("model", "opt-" + model_name)
        .add("forward", forward)
        .add("codec", Codec::name)
        .add("params", params)
        .add("batch", 1)
        .add("seq", o.seq)
        .add("blocks", c.num_hidden_layers)
        .add("streamed_blocks", policy.streamed_blocks())
        .add("slots", policy.plan().slots)
        .add("block_bytes", policy.block_bytes())
        .add("step_s", step)
        .add("step_s_min", *std::min_element(times.begin(), times.end()))
        .add("tokens_per_s", o.seq / step)
        .add("h2d_bytes_per_step", up)
        .add("d2h_bytes_per_step", down)
        .add("pinned_h2d_GBps", bw.h2d)
        .add("pinned_d2h_GBps", bw.d2h)
        .add("pinned_bidir_h2d_GBps", bw.bidir_h2d)
        .add("pinned_bidir_d2h_GBps", bw.bidir_d2h)
        .add("pcie_floor_s", floor_bidir)
        .add("pcie_floor_h2d_only_s", floor_h2d)
        .add("ratio_to_floor", step / floor_bidir)
        .add("peak_gpu_bytes", static_cast<double>(free0 - low))
        .add("policy_device_bound_bytes", policy.plan().device_bound_bytes)
        .add("host_pinned_bytes", policy.plan().host_pinned_bytes)
        .add("host_rss_peak_bytes", zo2_bench::peak_host_rss_bytes())
        .add("host_update_s_per_step_est", params * host_ns_all * 1e-9)
        .add("setup_s", setup_s)
        .add("elapsed_s", zo2_bench::now_seconds() - start_time)
        .print();
    if (o.timeline_for == model_name + "/" + Codec::name || o.timeline_for == "all")
      std::fprintf(stderr, "timeline of one step, opt-%s %s (ms from the step's start):\n%s", model_name.c_str(),
                   Codec::name, Timeline::format(visits).c_str());
};
  bool done = false;
#ifdef ZO2_BENCH_HAVE_OPT_CUDA
  if (o.forward == "opt") {
    try {
      opt::OPTCudaModel<bfloat16> m(c, policy.stream());
      struct HostBatch {
        std::size_t batch = 1, seq = 0;
        std::vector<std::int32_t> input_ids, attention_mask, labels;
      } hb;
      hb.seq = static_cast<std::size_t>(o.seq);
      for (long i = 0; i < o.seq; ++i) hb.input_ids.push_back(static_cast<std::int32_t>((i * 7919) % c.vocab_size));
      hb.labels = hb.input_ids;
      auto batch = m.make_batch(hb);
      measure(m, batch, "OPTCudaModel<bf16> (models/opt/cuda)");
      done = true;
    } catch (const std::exception& e) {
      JsonLine().add("bench", "offload_step").add("model", "opt-" + model_name).add("codec", Codec::name)
          .add("forward", "OPTCudaModel<bf16>").add("error", json_safe(e.what())).print();
    }
  }
#endif
  if (!done) {
    cublasHandle_t handle;
    ZO2_CUBLAS_CHECK(cublasCreate(&handle));
    ZO2_CUBLAS_CHECK(cublasSetStream(handle, policy.stream()));
    const long h = c.hidden_size, heads = c.num_attention_heads;
    DeviceBuffer<bfloat16> q(o.seq * h), k(o.seq * h), v(o.seq * h), att(o.seq * h), ff(o.seq * c.ffn_dim),
        scores(static_cast<std::size_t>(heads) * o.seq * o.seq), logits(o.seq * c.vocab_size);
    DeviceBuffer<double> loss(1);
    model.stream = policy.stream();
    model.cublas = handle;
    model.q = q.data(), model.k = k.data(), model.v = v.data(), model.att = att.data(), model.ff = ff.data();
    model.scores = scores.data(), model.logits = logits.data(), model.loss = loss.data();

    OptProxy::Batch batch;
    measure(model, batch, "opt-shaped GEMM proxy (bf16 cuBLAS), no softmax/LN");
    ZO2_CUBLAS_CHECK(cublasDestroy(handle));
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--models") o.models = split(v);
    else if (a == "--codecs") o.codecs = split(v);
    else if (a == "--steps") o.steps = std::stoi(v);
    else if (a == "--deadline") o.deadline = std::stod(v);
    else if (a == "--seq") o.seq = std::stol(v);
    else if (a == "--timeline") o.timeline_for = v;
    else if (a == "--forward") o.forward = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  const double start = zo2_bench::now_seconds();
  if (!device_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  const auto [host1, host_all] = host_update_ns_per_elem(threads);
  const Bandwidth bw = measure_pinned_bandwidth();
  cudaDeviceProp prop{};
  ZO2_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  JsonLine()
      .add("bench", "offload_env")
      .add("device", std::string(prop.name))
      .add("pinned_h2d_GBps", bw.h2d)
      .add("pinned_d2h_GBps", bw.d2h)
      .add("pinned_bidir_h2d_GBps", bw.bidir_h2d)
      .add("pinned_bidir_d2h_GBps", bw.bidir_d2h)
      .add("host_threads", threads)
      .add("host_update_ns_per_elem_1thread", host1)
      .add("host_update_ns_per_elem_all_threads", host_all)
      .add("host_update_s_per_step_opt6.7b_all_threads", 6.658e9 * host_all * 1e-9)
      .add("bf16_copy_s_per_step_opt6.7b_h2d", 6.658e9 * 2 / (bw.h2d * 1e9))
      .print();
  for (const auto& m : o.models)
    for (const auto& c : o.codecs) {
      if (zo2_bench::now_seconds() - start > o.deadline) {
        JsonLine().add("bench", "offload_step").add("model", "opt-" + m).add("codec", c).add("skipped", "deadline").print();
        continue;
      }
      try {
        if (c == "fp32") run_one<offload::Fp32Codec>(m, o, bw, host_all, start);
        else if (c == "bf16") run_one<offload::Bf16Codec>(m, o, bw, host_all, start);
        else if (c == "fp16") run_one<offload::Fp16Codec>(m, o, bw, host_all, start);
        else if (c == "int8") run_one<offload::Int8RowCodec>(m, o, bw, host_all, start);
        else throw Error("unknown codec " + c);
      } catch (const std::exception& e) {
        JsonLine().add("bench", "offload_step").add("model", "opt-" + m).add("codec", c).add("error", json_safe(e.what())).print();
      }
    }
  return 0;
}
