// zo2::MpiCommunicator under a real MPI launcher (CTest runs it with mpiexec -np 2 and -np 4):
// sums, the timeout of a rank that does not answer, the replica check, and ZOOptimizer's data
// parallelism over MPI against the single-process run each rank computes for itself. Every rank
// runs every test case in the same order (the collectives must match); the exit status is the
// worst over the ranks.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

#include <zo2/comm/mpi.hpp>
#include <zo2/comm/replicas.hpp>
#include <zo2/zo2.hpp>

#include "../support/dense_tanh_stack.hpp"

using namespace zo2;

namespace {

int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

using Stack = zo2_test::DenseTanhStack<double>;

ZOConfig config(ZOMethod method, unsigned queries) {
  ZOConfig cfg;
  cfg.method = method;
  cfg.queries = queries;
  cfg.lr = method == ZOMethod::kAdam ? 1e-3 : 2e-2;
  cfg.eps = 1e-3;
  cfg.weight_decay = 0.05;
  cfg.seed = 9001;
  return cfg;
}

/// Rows [from, to) of a regression batch.
Stack::Batch rows_of(const Stack::Batch& b, std::size_t d_in, std::size_t from, std::size_t to) {
  Stack::Batch s;
  s.rows = to - from;
  s.x.assign(b.x.begin() + static_cast<std::ptrdiff_t>(from * d_in), b.x.begin() + static_cast<std::ptrdiff_t>(to * d_in));
  s.y.assign(b.y.begin() + static_cast<std::ptrdiff_t>(from), b.y.begin() + static_cast<std::ptrdiff_t>(to));
  return s;
}

}  // namespace

TEST_CASE("all_reduce_sum: every rank gets the element-wise sum, any length, many times") {
  MpiCommunicator comm(MPI_COMM_WORLD, MpiOptions{CommSeconds(60)});
  const int n = comm.size();
  CHECK(n == world_size());
  for (std::size_t len : {std::size_t{0}, std::size_t{1}, std::size_t{4}, std::size_t{34}, std::size_t{4096}}) {
    CAPTURE(len);
    for (int round = 0; round < 50; ++round) {
      std::vector<double> v(len);
      for (std::size_t i = 0; i < len; ++i) v[i] = comm.rank() + 1 + 0.5 * static_cast<double>(i) + round;
      comm.all_reduce_sum(v);
      bool ok = true;
      for (std::size_t i = 0; i < len; ++i)
        ok = ok && v[i] == n * (n + 1) / 2.0 + n * (0.5 * static_cast<double>(i) + round);
      CHECK(ok);
    }
  }
  comm.barrier();
}

TEST_CASE("a rank that does not answer in time: the others throw a CommError naming the call; it can be finished") {
  MpiCommunicator comm(MPI_COMM_WORLD, MpiOptions{CommSeconds(0.3)});
  if (comm.size() < 2) return;
  std::vector<double> v{1.0, 2.0};
  if (comm.rank() == comm.size() - 1) {
    // The last rank is late by 1.5 s, then takes part with a generous timeout.
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    comm.all_reduce_sum(v, CommSeconds(30));
    CHECK(v[0] == comm.size());
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    std::string what;
    try {
      comm.all_reduce_sum(v);
    } catch (const CommError& e) {
      what = e.what();
    }
    CHECK(what.find("MPI_Iallreduce of 2 doubles") != std::string::npos);
    CHECK(what.find("on rank " + std::to_string(comm.rank()) + " of " + std::to_string(comm.size())) != std::string::npos);
    CHECK(what.find("within 0.3 s") != std::string::npos);
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(waited >= 0.3);
    CHECK(waited < 1.4);
    CHECK(comm.abandoned());
    CHECK_THROWS_WITH_AS(comm.all_reduce_sum(v), doctest::Contains("unusable"), CommError);
    CHECK(comm.finish_abandoned(CommSeconds(30)));
  }
  // Usable again on every rank.
  std::vector<double> w{static_cast<double>(comm.rank())};
  comm.all_reduce_sum(w, CommSeconds(30));
  CHECK(w[0] == comm.size() * (comm.size() - 1) / 2.0);
}

TEST_CASE("MPI errors are CommErrors naming the call and the rank") {
  CHECK_THROWS_WITH_AS(mpi_detail::check(MPI_ERR_COMM, "MPI_Example"), doctest::Contains("MPI_Example failed on rank"),
                       CommError);
}

TEST_CASE("replica check: equal hashes pass, a different one stops every rank naming the step and the rank") {
  MpiCommunicator comm(MPI_COMM_WORLD, MpiOptions{CommSeconds(60)});
  const std::uint64_t h = 0x0123456789abcdefull;
  CHECK_NOTHROW(check_replicas(comm, h, 5));
  const auto all = gather_hashes(comm, h + static_cast<std::uint64_t>(comm.rank()));
  REQUIRE(all.size() == static_cast<std::size_t>(comm.size()));
  for (int r = 0; r < comm.size(); ++r) CHECK(all[static_cast<std::size_t>(r)] == h + static_cast<std::uint64_t>(r));
  if (comm.size() < 2) return;
  const std::uint64_t mine = comm.rank() == 1 ? ~h : h;
  CHECK_THROWS_WITH_AS(check_replicas(comm, mine, 7), doctest::Contains("after step 7"), ReplicaDivergence);
  try {
    check_replicas(comm, mine, 7);
  } catch (const ReplicaDivergence& e) {
    CHECK(e.step() == 7);
    CHECK(std::string(e.what()).find("rank 1 " + replica_detail::hex(~h)) != std::string::npos);
  }
}

TEST_CASE("ZOOptimizer over MPI: shards step as the whole batch, split queries as all queries; replicas identical") {
  MpiCommunicator comm(MPI_COMM_WORLD, MpiOptions{CommSeconds(60)});
  const int n = comm.size();
  const Stack model;
  struct Case {
    DataParallel mode;
    ZOMethod method;
    unsigned queries;
  };
  for (const Case c : {Case{DataParallel::kBatch, ZOMethod::kSgd, 1}, Case{DataParallel::kBatch, ZOMethod::kAdam, 2},
                       Case{DataParallel::kQueries, ZOMethod::kSgd, static_cast<unsigned>(n)},
                       Case{DataParallel::kQueries, ZOMethod::kMomentum, 2 * static_cast<unsigned>(n)}}) {
    CAPTURE(static_cast<int>(c.mode));
    CAPTURE(c.queries);
    ZOConfig cfg = config(c.method, c.queries);
    ParameterStore<double> start(ModelLayout::of(model));
    zo2_test::init_random(start, 12);
    const std::size_t rows = 3 * static_cast<std::size_t>(n);
    auto batch = [&](std::uint32_t t) { return zo2_test::make_regression_batch<double>(rows, model.d_in, 700 + t); };
    // The single-process run, computed on every rank.
    ParameterStore<double> one = start;
    Resident<double, double> p1(one);
    ZOOptimizer o1(model, p1, cfg);
    std::vector<double> l1;
    for (std::uint32_t t = 0; t < 4; ++t) l1.push_back(o1.step(batch(t)).loss_plus);
    o1.flush();
    // This rank's part.
    ParameterStore<double> mine = start;
    Resident<double, double> p(mine);
    ZOOptimizer o(model, p, cfg);
    o.set_communicator(&comm, c.mode);
    const std::size_t per = rows / static_cast<std::size_t>(n), r = static_cast<std::size_t>(comm.rank());
    bool close = true;
    for (std::uint32_t t = 0; t < 4; ++t) {
      const Stack::Batch whole = batch(t);
      const Stack::Batch b = c.mode == DataParallel::kBatch ? rows_of(whole, model.d_in, r * per, (r + 1) * per) : whole;
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

int main(int argc, char** argv) {
  MpiSession session(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  doctest::Context context(argc, argv);
  const int result = context.run();
  int worst = result;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) std::printf("mpi: %s on every rank\n", worst == 0 ? "passed" : "FAILED");
  return worst;
}
