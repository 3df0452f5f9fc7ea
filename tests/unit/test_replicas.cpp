// zo2/comm/replicas.hpp without MPI: parameter_hash sees every bit of every group, and
// check_replicas / gather_hashes through any Communicator (ranks as threads here; under MPI in
// tests/mpi/test_mpi_communicator.cpp).
#include <doctest/doctest.h>

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include <zo2/comm/replicas.hpp>
#include <zo2/zo2.hpp>

#include "../support/dense_tanh_stack.hpp"
#include "../support/thread_ranks.hpp"

using namespace zo2;
using zo2_test::ThreadRanks;

namespace {


/// Runs fn(comm) on n ranks as threads; returns each rank's caught error message ("" if none).
template <class F>
std::vector<std::string> on_ranks(int n, F fn) {
  ThreadRanks ranks(n);
  std::vector<std::string> errors(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      ThreadRanks::Rank comm(&ranks, r);
      try {
        fn(comm);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace

TEST_CASE("parameter_hash: equal stores hash equal, any changed bit changes it") {
  const zo2_test::DenseTanhStack<float> model;
  ParameterStore<float> a(ModelLayout::of(model));
  zo2_test::init_random(a, 3);
  const ParameterStore<float> b = a;
  CHECK(parameter_hash(a) == parameter_hash(b));
  std::set<std::uint64_t> seen{parameter_hash(a)};
  std::size_t flips = 0;
  for (std::size_t g = 0; g < a.num_groups(); ++g) {
    const std::size_t n = a.model_layout().layout(GroupIndex{g}).total_elements();
    for (std::size_t i = 0; i < n; i += 7) {
      for (int bit : {0, 13, 31}) {
        ParameterStore<float> c = a;
        float* p = c.group(GroupIndex{g}).data() + i;
        std::uint32_t u;
        std::memcpy(&u, p, 4);
        u ^= 1u << bit;
        std::memcpy(p, &u, 4);
        seen.insert(parameter_hash(c));
        ++flips;
      }
    }
  }
  CHECK(seen.size() == flips + 1);  // every flip a hash of its own
  // The same values in other groups (moved between groups) hash differently too.
  ParameterStore<float> swapped = a;
  const auto g1 = swapped.group(GroupIndex{1}), g2 = swapped.group(GroupIndex{2});
  const std::size_t n = swapped.model_layout().layout(GroupIndex{1}).total_elements();
  for (std::size_t i = 0; i < n; ++i) std::swap(g1.data()[i], g2.data()[i]);
  CHECK(parameter_hash(swapped) != parameter_hash(a));
}

TEST_CASE("gather_hashes: every rank gets every rank's 64-bit hash exactly") {
  for (int n : {1, 2, 3, 5}) {
    CAPTURE(n);
    std::vector<std::vector<std::uint64_t>> got(static_cast<std::size_t>(n));
    const auto errors = on_ranks(n, [&](Communicator& comm) {
      got[static_cast<std::size_t>(comm.rank())] = gather_hashes(comm, 0xfedcba9876543210ull * static_cast<std::uint64_t>(comm.rank() + 1));
    });
    for (int r = 0; r < n; ++r) {
      CHECK(errors[static_cast<std::size_t>(r)].empty());
      REQUIRE(got[static_cast<std::size_t>(r)].size() == static_cast<std::size_t>(n));
      for (int k = 0; k < n; ++k)
        CHECK(got[static_cast<std::size_t>(r)][static_cast<std::size_t>(k)] == 0xfedcba9876543210ull * static_cast<std::uint64_t>(k + 1));
    }
  }
}

TEST_CASE("check_replicas: identical passes on every rank; a different rank stops all of them naming the step") {
  const auto same = on_ranks(3, [](Communicator& comm) { check_replicas(comm, 42, 100); });
  for (const auto& e : same) CHECK(e.empty());
  const auto differ = on_ranks(3, [](Communicator& comm) { check_replicas(comm, comm.rank() == 2 ? 43 : 42, 1200); });
  for (const auto& e : differ) {
    CHECK(e.find("replicas diverged: after step 1200") != std::string::npos);
    CHECK(e.find("1 of 3 ranks differ from rank 0's") != std::string::npos);
    CHECK(e.find("rank 2 000000000000002b") != std::string::npos);
  }
  // One process: nothing to compare.
  SingleProcess one;
  CHECK_NOTHROW(check_replicas(one, 1, 1));
}
