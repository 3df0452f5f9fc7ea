// comm_latency: the latency of a data-parallel step's reduction (its few doubles: 2q + 2 for q
// queries, two-side) and of the replica check (4 doubles per rank), as JSON lines.
//
//   mpiexec -n 2 build/zo2_comm_latency [--iterations N] [--transport mpi|nccl|all]
//
// Each measured operation is preceded by an MPI_Barrier, so it starts on every rank together;
// rank 0 reports the median, 10th, 90th and 99th percentile of its wall times. Transports:
//   mpi_blocking    MPI_Allreduce (the baseline: what MPI itself costs)
//   mpi             zo2::MpiCommunicator::all_reduce_sum (MPI_Iallreduce polled against the timeout)
//   nccl            zo2::NcclCommunicator::all_reduce_sum (host -> GPU, ncclAllReduce, GPU -> host),
//                   one GPU per rank by local rank (builds with NCCL; needs GPUs)
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <zo2/comm/mpi.hpp>
#if defined(ZO2_HAVE_NCCL)
#include <zo2/comm/nccl.hpp>
#endif

namespace {

struct Stats {
  double median, p10, p90, p99, mean;
};

Stats stats_of(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  auto at = [&](double q) { return us[static_cast<std::size_t>(q * static_cast<double>(us.size() - 1))]; };
  double sum = 0;
  for (double x : us) sum += x;
  return {at(0.5), at(0.1), at(0.9), at(0.99), sum / static_cast<double>(us.size())};
}

std::string host_name() {
  char name[MPI_MAX_PROCESSOR_NAME];
  int len = 0;
  MPI_Get_processor_name(name, &len);
  return std::string(name, static_cast<std::size_t>(len));
}

}  // namespace

int main(int argc, char** argv) {
  zo2::MpiSession session(&argc, &argv);
  int iterations = 2000;
  std::string transport = "all";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iterations" && i + 1 < argc) iterations = std::max(10, std::atoi(argv[++i]));
    else if (a == "--transport" && i + 1 < argc) transport = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--iterations N] [--transport mpi|nccl|all]\n", argv[0]);
      return 2;
    }
  }
  try {
    zo2::MpiCommunicator comm(MPI_COMM_WORLD, zo2::MpiOptions{zo2::CommSeconds(60)});
    const int rank = comm.rank(), size = comm.size();
    int local_rank = 0;
    {
      MPI_Comm local;
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
      MPI_Comm_rank(local, &local_rank);
      MPI_Comm_free(&local);
    }

    // name, reduce(values)
    std::vector<std::pair<std::string, std::function<void(std::vector<double>&)>>> ways;
    if (transport == "all" || transport == "mpi") {
      ways.emplace_back("mpi_blocking", [](std::vector<double>& v) {
        zo2::mpi_detail::check(MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_DOUBLE, MPI_SUM,
                                             MPI_COMM_WORLD),
                               "MPI_Allreduce");
      });
      ways.emplace_back("mpi", [&](std::vector<double>& v) { comm.all_reduce_sum(v); });
    }
#if defined(ZO2_HAVE_NCCL)
    std::unique_ptr<zo2::NcclCommunicator> nccl;
    if (transport == "all" || transport == "nccl") {
      int devices = 0;
      if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
        nccl = std::make_unique<zo2::NcclCommunicator>(MPI_COMM_WORLD, local_rank % devices,
                                                       zo2::NcclOptions{zo2::CommSeconds(60)});
        ways.emplace_back("nccl", [&](std::vector<double>& v) { nccl->all_reduce_sum(v); });
      } else if (rank == 0) {
        std::fprintf(stderr, "comm_latency: no CUDA device: NCCL not measured\n");
      }
    }
#else
    if (transport == "nccl" && rank == 0) std::fprintf(stderr, "comm_latency: built without NCCL\n");
#endif

    // A step's reduction with q = 1, 4, 16 queries (2q + 2 doubles), and the replica check.
    const std::vector<std::pair<std::string, std::size_t>> payloads = {
        {"step_q1", 4}, {"step_q4", 10}, {"step_q16", 34}, {"replica_check", 4 * static_cast<std::size_t>(size)}};
    const std::string host = host_name();
    for (const auto& [name, reduce] : ways) {
      for (const auto& [what, n] : payloads) {
        std::vector<double> v(n, 1.0);
        for (int w = 0; w < 100; ++w) reduce(v);  // warm-up (connections, NCCL's first launch)
        std::vector<double> us;
        us.reserve(static_cast<std::size_t>(iterations));
        for (int it = 0; it < iterations; ++it) {
          std::fill(v.begin(), v.end(), 1.0 + rank);
          MPI_Barrier(MPI_COMM_WORLD);
          const auto t0 = std::chrono::steady_clock::now();
          reduce(v);
          us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
          if (v[0] != size * (size + 1) / 2.0) throw zo2::Error("wrong sum from " + name);
        }
        // Back to back, no barrier: the pipelined cost per operation.
        MPI_Barrier(MPI_COMM_WORLD);
        const auto t0 = std::chrono::steady_clock::now();
        for (int it = 0; it < iterations; ++it) reduce(v);
        const double loop_us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iterations;
        const Stats s = stats_of(us);
        if (rank == 0)
          std::printf("{\"kind\":\"allreduce_latency\",\"transport\":\"%s\",\"payload\":\"%s\",\"doubles\":%zu,"
                      "\"ranks\":%d,\"host\":\"%s\",\"iterations\":%d,\"median_us\":%.2f,\"p10_us\":%.2f,"
                      "\"p90_us\":%.2f,\"p99_us\":%.2f,\"mean_us\":%.2f,\"back_to_back_us\":%.2f}\n",
                      name.c_str(), what.c_str(), n, size, host.c_str(), iterations, s.median, s.p10, s.p90, s.p99,
                      s.mean, loop_us);
        std::fflush(stdout);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "comm_latency: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  return 0;
}
