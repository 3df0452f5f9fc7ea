// zo2::NcclCommunicator on GPUs, one rank per GPU under an MPI launcher (CTest: mpiexec -n 1, which
// runs the whole transport -- host -> GPU, ncclAllReduce, GPU -> host -- on one GPU; on a machine
// with N GPUs run it with -n N). Built without MPI, it runs one rank by itself (the unique id stays
// in the process). Prints "SKIPPED: no CUDA device" and passes where there is no GPU.
// Checks sums, NCCL_NVLS_ENABLE=0, ZOOptimizer's data parallelism over NCCL against the
// single-process run each rank computes itself, the replica check over NCCL, (N >= 2) that a late
// rank makes the others throw after the timeout, and prints the latency of a step's reduction
// (4 doubles, median of 2000) as a JSON line.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <algorithm>

#if defined(ZO2_HAVE_MPI)
#include <zo2/comm/mpi.hpp>
#endif
#include <zo2/comm/nccl.hpp>
#include <zo2/comm/replicas.hpp>
#include <zo2/zo2.hpp>

#include "../support/dense_tanh_stack.hpp"

using namespace zo2;

namespace {

int g_device = 0;
int g_rank = 0, g_size = 1;

#if defined(ZO2_HAVE_MPI)
int local_rank() {
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);
  int r = 0;
  MPI_Comm_rank(local, &r);
  MPI_Comm_free(&local);
  return r;
}
std::unique_ptr<NcclCommunicator> make_comm(double timeout_s) {
  return std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, g_device, NcclOptions{CommSeconds(timeout_s)});
}
void barrier() { MPI_Barrier(MPI_COMM_WORLD); }
#else
std::unique_ptr<NcclCommunicator> make_comm(double timeout_s) {
  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) throw CommError("ncclGetUniqueId failed");
  return std::make_unique<NcclCommunicator>(id, 0, 1, g_device, NcclOptions{CommSeconds(timeout_s)});
}
void barrier() {}
#endif

using Stack = zo2_test::DenseTanhStack<double>;

}  // namespace

TEST_CASE("NCCL: every rank gets the element-wise sum, any length; NVLS stays off") {
  auto owned = make_comm(120);
  NcclCommunicator& comm = *owned;
  const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
  REQUIRE(nvls != nullptr);
  CHECK(std::string(nvls) == "0");
  const int n = comm.size();
  for (std::size_t len : {std::size_t{1}, std::size_t{4}, std::size_t{34}, std::size_t{4096}}) {
    CAPTURE(len);
    bool ok = true;
    for (int round = 0; round < 50; ++round) {
      std::vector<double> v(len);
      for (std::size_t i = 0; i < len; ++i) v[i] = comm.rank() + 1 + 0.5 * static_cast<double>(i) + round;
      comm.all_reduce_sum(v);
      for (std::size_t i = 0; i < len; ++i) ok = ok && v[i] == n * (n + 1) / 2.0 + n * (0.5 * static_cast<double>(i) + round);
    }
    CHECK(ok);
  }
}

TEST_CASE("ZOOptimizer over NCCL: shards step as the whole batch, split queries as all queries; replicas identical") {
  auto owned = make_comm(120);
  NcclCommunicator& comm = *owned;
  const int n = comm.size();
  const Stack model;
  for (DataParallel mode : {DataParallel::kBatch, DataParallel::kQueries}) {
    CAPTURE(static_cast<int>(mode));
    ZOConfig cfg;
    cfg.method = ZOMethod::kAdam;
    cfg.queries = 2 * static_cast<unsigned>(n);
    cfg.lr = 1e-3;
    cfg.eps = 1e-3;
    cfg.weight_decay = 0.05;
    cfg.seed = 9001;
    ParameterStore<double> start(ModelLayout::of(model));
    zo2_test::init_random(start, 12);
    const std::size_t rows = 3 * static_cast<std::size_t>(n);
    auto batch = [&](std::uint32_t t) { return zo2_test::make_regression_batch<double>(rows, model.d_in, 700 + t); };
    ParameterStore<double> one = start;
    Resident<double, double> p1(one);
    ZOOptimizer o1(model, p1, cfg);
    std::vector<double> l1;
    for (std::uint32_t t = 0; t < 4; ++t) l1.push_back(o1.step(batch(t)).loss_plus);
    o1.flush();
    ParameterStore<double> mine = start;
    Resident<double, double> p(mine);
    ZOOptimizer o(model, p, cfg);
    o.set_communicator(&comm, mode);
    const std::size_t per = rows / static_cast<std::size_t>(n), r = static_cast<std::size_t>(comm.rank());
    bool close = true;
    for (std::uint32_t t = 0; t < 4; ++t) {
      Stack::Batch b = batch(t);
      if (mode == DataParallel::kBatch) {
        Stack::Batch s;
        s.rows = per;
        s.x.assign(b.x.begin() + static_cast<std::ptrdiff_t>(r * per * model.d_in),
                   b.x.begin() + static_cast<std::ptrdiff_t>((r + 1) * per * model.d_in));
        s.y.assign(b.y.begin() + static_cast<std::ptrdiff_t>(r * per), b.y.begin() + static_cast<std::ptrdiff_t>((r + 1) * per));
        b = s;
      }
      const double l = o.step(b).loss_plus;
      close = close && std::abs(l - l1[t]) <= 1e-9 * std::abs(l1[t]);
    }
    o.flush();
    CHECK(close);
    CHECK_NOTHROW(check_replicas(comm, parameter_hash(mine), 4));
    double worst = 0;
    for (std::size_t g = 0; g < mine.num_groups(); ++g) {
      const auto a = mine.group(GroupIndex{g}), b = one.group(GroupIndex{g});
      for (std::size_t i = 0; i < mine.model_layout().layout(GroupIndex{g}).total_elements(); ++i)
        worst = std::max(worst, std::abs(a.data()[i] - b.data()[i]));
    }
    CHECK(worst < 1e-9);
  }
}

TEST_CASE("NCCL: a late rank makes the others throw after the timeout, naming ncclAllReduce") {
  const int n = g_size, rank = g_rank;
  if (n < 2) return;
  auto owned = make_comm(0.5);
  NcclCommunicator& comm = *owned;
  std::vector<double> v{1.0};
  if (rank == n - 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2000));
    // Its peers aborted their communicators: this rank times out too.
    CHECK_THROWS_AS(comm.all_reduce_sum(v, CommSeconds(3)), CommError);
  } else {
    CHECK_THROWS_WITH_AS(comm.all_reduce_sum(v), doctest::Contains("ncclAllReduce of 1 doubles on rank"), CommError);
    CHECK_THROWS_WITH_AS(comm.all_reduce_sum(v), doctest::Contains("unusable"), CommError);
  }
  barrier();
}

TEST_CASE("NCCL: latency of a step's reduction (4 doubles), printed as a JSON line") {
  auto owned = make_comm(120);
  NcclCommunicator& comm = *owned;
  std::vector<double> v(4, 1.0), us;
  for (int i = 0; i < 200; ++i) comm.all_reduce_sum(v);
  for (int i = 0; i < 2000; ++i) {
    barrier();
    const auto t0 = std::chrono::steady_clock::now();
    comm.all_reduce_sum(v);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  if (g_rank == 0)
    std::printf("{\"kind\":\"allreduce_latency\",\"transport\":\"nccl\",\"payload\":\"step_q1\",\"doubles\":4,"
                "\"ranks\":%d,\"iterations\":2000,\"median_us\":%.2f,\"p10_us\":%.2f,\"p90_us\":%.2f}\n",
                comm.size(), us[us.size() / 2], us[us.size() / 10], us[us.size() * 9 / 10]);
  CHECK(us[us.size() / 2] > 0);
}

int main(int argc, char** argv) {
#if defined(ZO2_HAVE_MPI)
  MpiSession session(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
#endif
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    if (g_rank == 0) std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
#if defined(ZO2_HAVE_MPI)
  g_device = local_rank() % devices;
#endif
  doctest::Context context(argc, argv);
  const int result = context.run();
  int worst = result;
#if defined(ZO2_HAVE_MPI)
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
#endif
  if (g_rank == 0) std::printf("nccl: %s on every rank\n", worst == 0 ? "passed" : "FAILED");
  return worst;
}
