// bench/perturb_bandwidth.cu -- achieved memory bandwidth of the CUDA perturb kernels
// (backend/cuda/perturb.cuh) on one OPT-6.7B-shaped block (~201M parameters), against the
// device's own device-to-device cudaMemcpy bandwidth.
//
// Bytes counted are the fewest each pass must move: the fused pass with an owed update reads
// and writes theta and writes plus and minus; without one it reads theta and writes plus and
// minus; the update reads and writes theta; convert reads theta and writes one copy. A copy
// counts bytes read plus bytes written. Times are medians of CUDA-event timings after warm-up.
//
// Prints one JSON line per measurement, then a short table.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <zo2/zo2.hpp>

namespace {

using namespace zo2;
using gpu::detail::Op;

constexpr int kWarmup = 3;
constexpr int kRuns = 25;

template <class X>
const char* dtype_name() {
  if constexpr (std::is_same_v<X, float>) return "fp32";
  else if constexpr (std::is_same_v<X, bfloat16>) return "bf16";
  else return "fp16";
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Median milliseconds of `launch` over kRuns, timed with events on `stream`.
template <class F>
double time_ms(cudaStream_t stream, F&& launch) {
  for (int i = 0; i < kWarmup; ++i) launch();
  ZO2_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<gpu::Event> start, stop;
  for (int i = 0; i < kRuns; ++i) {
    start.emplace_back(true);
    stop.emplace_back(true);
  }
  for (int i = 0; i < kRuns; ++i) {
    start[i].record(stream);
    launch();
    stop[i].record(stream);
  }
  ZO2_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> ms;
  for (int i = 0; i < kRuns; ++i) ms.push_back(stop[i].elapsed_ms_since(start[i]));
  return median(ms);
}

/// An OPT-6.7B decoder block: hidden 4096, FFN 16384.
ParamLayout opt_block_layout(std::int64_t d = 4096, std::int64_t ffn = 16384) {
  ParamLayout l;
  for (const char* p : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
    l.add(std::string(p) + ".weight", {d, d});
    l.add(std::string(p) + ".bias", {d}, false);
  }
  l.add("self_attn_layer_norm.weight", {d}, false);
  l.add("self_attn_layer_norm.bias", {d}, false);
  l.add("fc1.weight", {ffn, d});
  l.add("fc1.bias", {ffn}, false);
  l.add("fc2.weight", {d, ffn});
  l.add("fc2.bias", {d}, false);
  l.add("final_layer_norm.weight", {d}, false);
  l.add("final_layer_norm.bias", {d}, false);
  return l;
}

template <class S>
__global__ void init_kernel(S* theta, std::size_t n, std::uint64_t seed) {
  for (std::size_t q = blockIdx.x * blockDim.x + threadIdx.x; 4 * q < n; q += gridDim.x * blockDim.x) {
    const Normal4 z = normal4(seed, 0, 0, q);
    for (int k = 0; k < 4 && 4 * q + k < n; ++k) theta[4 * q + k] = store_rounded<S>(0.02f * z.z[k], 0, false);
  }
}

struct Context {
  std::string device;
  double memcpy_gbps = 0;
  cudaStream_t stream = nullptr;
};

void print_line(const Context& c, const char* op, bool pending, const char* storage, const char* out, int chunks,
                int min_blocks, std::size_t elements, double bytes, double ms) {
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  std::printf(
      "{\"bench\":\"perturb_bandwidth\",\"device\":\"%s\",\"op\":\"%s\",\"pending_update\":%s,\"storage\":\"%s\","
      "\"out\":\"%s\",\"chunks\":%d,\"min_blocks\":%d,\"elements\":%zu,\"bytes\":%.0f,\"ms\":%.4f,"
      "\"gbps\":%.1f,\"memcpy_gbps\":%.1f,\"ratio\":%.3f}\n",
      c.device.c_str(), op, pending ? "true" : "false", storage, out, chunks, min_blocks, elements, bytes, ms, gbps,
      c.memcpy_gbps, gbps / c.memcpy_gbps);
  std::fflush(stdout);
}

/// Times one pass and prints its line. Chunks: 16-byte chunks per thread-iteration; MinBlocks:
/// __launch_bounds__ minimum blocks per SM (1: the compiler's register choice).
template <Op op, class S, class T, int Chunks, int MinBlocks>
void measure(const Context& c, S* theta, T* out0, T* out1, const gpu::GroupTable& table, bool pending,
             std::size_t elements) {
  gpu::detail::KernelArgs a{};
  a.first_tensor_id = 5;
  a.seed = 0x5eed;
  a.step = 1000;
  a.c = 1e-3;
  a.has_update = pending;
  a.update_step = 999;
  a.lr = 1e-6;
  a.g = 0.37;
  a.wd = 0.01;
  const double ms = time_ms(c.stream, [&] {
    gpu::detail::launch<op, S, T, Chunks, MinBlocks>(theta, out0, out1, table, a, c.stream);
  });
  const double s = sizeof(S), t = sizeof(T), e = static_cast<double>(elements);
  double bytes = 0;
  const char* name = "";
  if constexpr (op == Op::kUpdateAndPerturb) {
    name = "update_and_perturb";
    bytes = e * ((pending ? 2 : 1) * s + 2 * t);
  } else if constexpr (op == Op::kUpdate) {
    name = "update";
    bytes = e * 2 * s;
  } else if constexpr (op == Op::kConvert) {
    name = "convert";
    bytes = e * (s + t);
  }
  print_line(c, name, pending, dtype_name<S>(), dtype_name<T>(), Chunks, MinBlocks, elements, bytes, ms);
}

template <class S, class T>
void bench_pair(const Context& c, const ParamLayout& layout) {
  const std::size_t n = layout.total_elements();
  std::size_t elements = 0;
  for (const auto& s : layout.specs()) elements += s.numel();
  gpu::GroupTable table(layout);
  gpu::DeviceBuffer<S> theta(n);
  gpu::DeviceBuffer<T> plus(n), minus(n);
  init_kernel<S><<<1024, 256, 0, c.stream>>>(theta.data(), n, 42);
  ZO2_CUDA_CHECK_LAUNCH("init_kernel");
  ZO2_CUDA_CHECK(cudaMemsetAsync(plus.data(), 0x3c, plus.bytes(), c.stream));
  ZO2_CUDA_CHECK(cudaMemsetAsync(minus.data(), 0x3c, minus.bytes(), c.stream));
  S* th = theta.data();
  T *p = plus.data(), *m = minus.data();
  measure<Op::kUpdateAndPerturb, S, T, 1, 1>(c, th, p, m, table, true, elements);
  measure<Op::kUpdateAndPerturb, S, T, 2, 1>(c, th, p, m, table, true, elements);
  measure<Op::kUpdateAndPerturb, S, T, 1, 4>(c, th, p, m, table, true, elements);
  measure<Op::kUpdateAndPerturb, S, T, 1, 5>(c, th, p, m, table, true, elements);
  measure<Op::kUpdateAndPerturb, S, T, 1, 1>(c, th, p, m, table, false, elements);
  measure<Op::kUpdateAndPerturb, S, T, 2, 1>(c, th, p, m, table, false, elements);
  if constexpr (std::is_same_v<S, T>) {
    measure<Op::kUpdate, S, S, 1, 1>(c, th, nullptr, nullptr, table, true, elements);
    measure<Op::kUpdate, S, S, 1, 5>(c, th, nullptr, nullptr, table, true, elements);
  } else {
    measure<Op::kConvert, S, T, 1, 1>(c, th, p, nullptr, table, false, elements);
  }
}

double memcpy_gbps(cudaStream_t stream) {
  const std::size_t bytes = std::size_t{1} << 30;
  gpu::DeviceBuffer<unsigned char> a(bytes), b(bytes);
  ZO2_CUDA_CHECK(cudaMemsetAsync(a.data(), 0x5a, bytes, stream));
  const double ms = time_ms(stream, [&] {
    ZO2_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
}

}  // namespace

int main() {
  if (!gpu::device_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  try {
    cudaDeviceProp prop{};
    ZO2_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    gpu::Stream stream;
    Context c;
    c.device = prop.name;
    c.stream = stream.get();
    c.memcpy_gbps = memcpy_gbps(c.stream);
    std::printf(
        "{\"bench\":\"perturb_bandwidth\",\"device\":\"%s\",\"op\":\"cudaMemcpy_d2d\",\"bytes\":%zu,\"gbps\":%.1f,"
        "\"sms\":%d,\"l2_bytes\":%d}\n",
        c.device.c_str(), std::size_t{2} << 30, c.memcpy_gbps, prop.multiProcessorCount, prop.l2CacheSize);
    const ParamLayout layout = opt_block_layout();
    bench_pair<float, float>(c, layout);
    bench_pair<bfloat16, bfloat16>(c, layout);
    bench_pair<float16, float16>(c, layout);
    bench_pair<bfloat16, float>(c, layout);
    bench_pair<float, bfloat16>(c, layout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "perturb_bandwidth: %s\n", e.what());
    return 1;
  }
  return 0;
}
