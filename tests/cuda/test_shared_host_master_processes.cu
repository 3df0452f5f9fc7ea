// One pinned host master shared by two PROCESSES (SharedHostMaster::create_in_shared_memory /
// attach_to_shared_memory): this test's process is seat 0 and starts a second copy of this
// program (posix_spawn of /proc/self/exe, so its CUDA is its own) as seat 1, both on the one GPU,
// as mpirun's ranks of one host would be on theirs.
// - both seats' losses, encoded masters, decoded parameters and rule state (zo-mmt) are
//   bit-identical to a lone HostOffload's over 12 steps, for int8 rows and bf16, write-back
//   every 1 and 4 steps; the master is pinned once (the seats pin nothing); the follower writes
//   nothing back; the name can be removed once both attached, and the follower finishes;
// - a process whose plan or model differs from the master's is refused at attach, naming the
//   field (before it maps anything for CUDA); a seat taken is refused;
// - a follower process that dies mid-run (after its work completed) makes seat 0 throw an
//   Error naming the seat within the wait timeout instead of hanging.
// The second process runs the test case "[child] seat 1 of a shared host master" of this
// program, told what to do through the environment; run alone, that case does nothing.
#include <doctest/doctest.h>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/host_offload.cuh>
#include <zo2/offload/shared_host_master.cuh>

#include "../support/dense_tanh_stack.hpp"
#include "../support/device_dense_tanh_stack.cuh"
#include "../support/offload_seat_run.cuh"
#include "../support/offload_snapshot.hpp"
#include "../support/offload_test_inputs.hpp"

extern char** environ;

using namespace zo2;
using zo2::gpu::HostOffload;
using zo2::gpu::OffloadOptions;
using zo2::gpu::SharedHostMaster;
using zo2::gpu::SharedSeat;
using zo2_test::DenseTanhStack;
using zo2_test::DeviceDenseTanhStack;

namespace {

const char* const kChildCase = "[child] seat 1 of a shared host master";

bool have_device() {
  static const bool ok = [] {
    const bool d = zo2::gpu::device_available();
    if (!d) std::printf("SKIPPED: no CUDA device (test_shared_host_master_processes)\n");
    return d;
  }();
  return ok;
}

ZOConfig config() { return zo2_test::seat_test_config(ZOMethod::kMomentum); }

OffloadOptions options_for(unsigned every) {
  OffloadOptions o;
  o.rule_state_slots = 1;
  o.writeback_every = every;
  return o;
}

template <class Codec>
using Policy = HostOffload<Codec, float>;

template <class Codec>
using Run = zo2_test::SeatRun<Codec>;

/// What a run ends with, as bytes a process can write and its parent read.
struct Trace {
  std::vector<double> steps;  // loss+, loss-, projected gradient per step
  std::vector<unsigned char> encoded;
  std::vector<float> state, params;
};

/// 6 steps, flush, 6 steps, flush (a follower's get_group needs nothing owed).
template <class Codec>
Trace train(Run<Codec>& r, const DeviceDenseTanhStack::Batch& batch) {
  Trace t;
  for (int half = 0; half < 2; ++half) {
    for (int s = 0; s < 6; ++s) {
      const StepResult res = r.opt.step(batch);
      t.steps.insert(t.steps.end(), {res.loss_plus, res.loss_minus, res.projected_grad});
    }
    r.opt.flush();
  }
  t.encoded = zo2_test::encoded_of(r.policy);
  t.state = zo2_test::state_of(r.policy);
  t.params = zo2_test::params_of<Codec>(r.policy);
  return t;
}

template <class V>
void write_vec(std::ofstream& f, const V& v) {
  const std::uint64_t n = v.size();
  f.write(reinterpret_cast<const char*>(&n), sizeof n);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(n * sizeof(v[0])));
}
template <class V>
void read_vec(std::ifstream& f, V& v) {
  std::uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), sizeof n);
  REQUIRE(f.good());
  REQUIRE(n < (std::uint64_t{1} << 28));
  v.resize(n);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(v[0])));
  REQUIRE(f.good());
}
void write_trace(const std::string& path, const Trace& t) {
  std::ofstream f(path, std::ios::binary);
  write_vec(f, t.steps);
  write_vec(f, t.encoded);
  write_vec(f, t.state);
  write_vec(f, t.params);
  if (!f) throw Error("cannot write " + path);
}
Trace read_trace(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  Trace t;
  read_vec(f, t.steps);
  read_vec(f, t.encoded);
  read_vec(f, t.state);
  read_vec(f, t.params);
  return t;
}

void check_same(const Trace& want, const Trace& got) {
  REQUIRE(want.steps.size() == got.steps.size());
  for (std::size_t i = 0; i < want.steps.size(); ++i) {
    CAPTURE(i);
    REQUIRE(std::isfinite(want.steps[i]));
    CHECK(want.steps[i] == got.steps[i]);
  }
  CHECK(want.encoded == got.encoded);
  CHECK(want.state == got.state);
  CHECK(want.params == got.params);
}

/// Starts this program as seat 1 with `env` added to the environment; returns its pid.
pid_t spawn_child(const std::vector<std::string>& env) {
  std::vector<std::string> vars(env);
  for (char** e = environ; *e; ++e) vars.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& v : vars) envp.push_back(v.data());
  envp.push_back(nullptr);
  std::string exe = "/proc/self/exe", filter = std::string("--test-case=") + kChildCase;
  std::vector<char*> argv{exe.data(), filter.data(), nullptr};
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe.c_str(), nullptr, nullptr, argv.data(), envp.data());
  REQUIRE(rc == 0);
  return pid;
}
int wait_child(pid_t pid) {
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string unique_name(const char* what) {
  static int n = 0;
  return "/zo2-test-" + std::string(what) + "-" + std::to_string(getpid()) + "-" + std::to_string(n++);
}

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

/// Seat 1's body in the child process (see the file comment).
template <class Codec>
int run_child(const std::string& name, const std::string& out, unsigned every, bool die) {
  const DenseTanhStack<float> shape = zo2_test::offload_test_shape();
  const auto init = zo2_test::escaped_bf16_store(shape, 61);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 19));
  auto shared = SharedHostMaster<Codec, float>::attach_to_shared_memory(name, ModelLayout::of(shape), options_for(every),
                                                                        2, std::chrono::seconds(60));
  shared.set_wait_timeout(std::chrono::seconds(60));
  Run<Codec> r(init, shape, config(), options_for(every), shared.seat(1));
  if (die) {
    for (int s = 0; s < 2; ++s) r.opt.step(batch);
    ZO2_CUDA_CHECK(cudaDeviceSynchronize());  // its recorded events complete; then it vanishes
    std::fflush(nullptr);
    _exit(0);
  }
  write_trace(out, train(r, batch));
  if (r.policy.bytes_offloaded() != 0) return 3;  // a follower writes nothing back
  return 0;
}

template <class Codec>
void check_processes(unsigned every) {
  const DenseTanhStack<float> shape = zo2_test::offload_test_shape();
  const auto init = zo2_test::escaped_bf16_store(shape, 61);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 19));
  Trace want;
  std::size_t lone_pinned = 0, lone_offloaded = 0;
  {
    Run<Codec> lone(init, shape, config(), options_for(every));
    want = train(lone, batch);
    lone_pinned = lone.policy.owned_pinned_bytes();
    lone_offloaded = lone.policy.bytes_offloaded();
  }
  const std::string name = unique_name("bits");
  const std::string out = "/tmp" + name + ".trace";
  auto shared = SharedHostMaster<Codec, float>::create_in_shared_memory(name, ModelLayout::of(shape),
                                                                        options_for(every), 2);
  CHECK(shared.across_processes());
  shared.set_wait_timeout(std::chrono::seconds(60));
  Run<Codec> leader(init, shape, config(), options_for(every), shared.seat(0));  // loads the shared masters
  const pid_t child = spawn_child({"ZO2_TEST_SHM=" + name, "ZO2_TEST_OUT=" + out,
                                   "ZO2_TEST_CODEC=" + std::string(Codec::name),
                                   "ZO2_TEST_EVERY=" + std::to_string(every)});
  const Trace mine = train(leader, batch);
  // Seat 1 has attached (the leader's write-backs waited for its visits): the name may go, and
  // the child finishes on its mapping.
  CHECK(access(("/dev/shm" + name).c_str(), F_OK) == 0);
  shared.remove_name();
  CHECK(access(("/dev/shm" + name).c_str(), F_OK) != 0);
  REQUIRE(wait_child(child) == 0);
  const Trace theirs = read_trace(out);
  std::remove(out.c_str());
  check_same(want, mine);
  check_same(want, theirs);
  CHECK(shared.pinned_bytes() == lone_pinned);
  CHECK(leader.policy.owned_pinned_bytes() == 0);
  CHECK(leader.policy.bytes_offloaded() == lone_offloaded);
}

}  // namespace

TEST_CASE("[child] seat 1 of a shared host master") {
  const char* name = std::getenv("ZO2_TEST_SHM");
  if (!name) return;  // run alone: nothing to do (the parent cases start it)
  const std::string codec = env_or("ZO2_TEST_CODEC", "");
  const unsigned every = static_cast<unsigned>(std::atoi(env_or("ZO2_TEST_EVERY", "1")));
  const bool die = std::string(env_or("ZO2_TEST_DIE", "0")) == "1";
  const std::string out = env_or("ZO2_TEST_OUT", "");
  int rc = 2;
  try {
    if (codec == offload::Int8RowCodec::name) rc = run_child<offload::Int8RowCodec>(name, out, every, die);
    else if (codec == offload::Bf16Codec::name) rc = run_child<offload::Bf16Codec>(name, out, every, die);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "seat 1: %s\n", e.what());
    rc = 1;
  }
  std::fflush(nullptr);
  _exit(rc);  // the parent reads the exit code; nothing of doctest's runs after
}

TEST_CASE("two processes sharing one host master give a lone engine's bits" * doctest::skip(!have_device())) {
  for (unsigned k : {1u, 4u}) {
    CAPTURE(k);
    check_processes<offload::Int8RowCodec>(k);
    check_processes<offload::Bf16Codec>(k);
  }
}

TEST_CASE("a process whose plan or model differs is refused at attach" * doctest::skip(!have_device())) {
  using Codec = offload::Bf16Codec;
  const DenseTanhStack<float> shape = zo2_test::offload_test_shape();
  const ModelLayout ml = ModelLayout::of(shape);
  const std::string name = unique_name("refuse");
  auto shared = SharedHostMaster<Codec, float>::create_in_shared_memory(name, ml, options_for(4), 2);
  const auto attach = [&](const ModelLayout& l, const OffloadOptions& o) {
    return SharedHostMaster<Codec, float>::attach_to_shared_memory(name, l, o, 2, std::chrono::seconds(5));
  };
  CHECK_THROWS_WITH_AS(attach(ml, options_for(2)), doctest::Contains("writeback_every"), ConfigError);
  OffloadOptions stateless = options_for(4);
  stateless.rule_state_slots = 0;
  CHECK_THROWS_WITH_AS(attach(ml, stateless), doctest::Contains("rule_state_slots"), ConfigError);
  CHECK_THROWS_WITH_AS(attach(ModelLayout::of(zo2_test::offload_test_shape(6)), options_for(4)),
                       doctest::Contains("num_blocks"), ConfigError);
  using Int8Master = SharedHostMaster<offload::Int8RowCodec, float>;
  using Master = SharedHostMaster<Codec, float>;
  CHECK_THROWS_WITH_AS(Int8Master::attach_to_shared_memory(name, ml, options_for(4), 2, std::chrono::seconds(5)),
                       doctest::Contains("codec"), ConfigError);
  CHECK_THROWS_AS(shared.seat(2), ConfigError);
  CHECK_THROWS_AS(Master::attach_to_shared_memory(unique_name("missing"), ml, options_for(4), 2,
                                                  std::chrono::milliseconds(300)),
                  Error);
  Policy<Codec> leader(ml, options_for(4), nullptr, shared.seat(0));
  CHECK_THROWS_WITH_AS(Policy<Codec>(ml, options_for(4), nullptr, shared.seat(0)), doctest::Contains("taken"),
                       ConfigError);
  // (A seat taken in another process: the region's claim words, tests/unit/test_master_region.cpp.)
}

TEST_CASE("a follower process that dies stops seat 0 with an error, not a hang" * doctest::skip(!have_device())) {
  using Codec = offload::Int8RowCodec;
  const DenseTanhStack<float> shape = zo2_test::offload_test_shape();
  const auto init = zo2_test::escaped_bf16_store(shape, 61);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 19));
  const std::string name = unique_name("dies");
  auto shared = SharedHostMaster<Codec, float>::create_in_shared_memory(name, ModelLayout::of(shape), options_for(1), 2);
  shared.set_wait_timeout(std::chrono::seconds(60));  // long enough for the child to start
  Run<Codec> leader(init, shape, config(), options_for(1), shared.seat(0));
  const pid_t child = spawn_child({"ZO2_TEST_SHM=" + name, "ZO2_TEST_CODEC=" + std::string(Codec::name),
                                   "ZO2_TEST_EVERY=1", "ZO2_TEST_DIE=1"});
  for (int s = 0; s < 2; ++s) leader.opt.step(batch);
  REQUIRE(wait_child(child) == 0);  // seat 1 took two steps and is gone
  shared.set_wait_timeout(std::chrono::seconds(2));
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(
      [&] {
        for (int s = 0; s < 4; ++s) leader.opt.step(batch);
      }(),
      doctest::Contains("seat 1"), Error);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30));
}
