// zo2-opt: data-parallel plumbing (parallel.hpp): MPI start-up, rank -> GPU, the step's
// communicator (MPI or NCCL), batch shards and the replica check.
#include "parallel.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>

#include <unistd.h>

#include <zo2/comm/comm_error.hpp>
#include <zo2/comm/replicas.hpp>
#include <zo2/core/error.hpp>

#if defined(ZO2_HAVE_MPI)
#include <zo2/comm/mpi.hpp>
#endif
#if defined(ZO2_HAVE_NCCL)
#include <zo2/comm/nccl.hpp>
#endif
#if defined(ZO2_OPT_CUDA)
#include <cuda_runtime.h>
#endif

#include "engine.hpp"

namespace zo2_opt {

namespace {

/// zo2::parameter_hash of the engine's parameters (the same value, bits of every group in order),
/// read one group at a time: no rank ever holds a second copy of the model for the check.
std::uint64_t parameter_hash(Engine& engine) {
  std::uint64_t h = 0x5a4f32u;  // "ZO2", as zo2::parameter_hash
  const zo2::ModelLayout& ml = engine.model_layout();
  std::vector<float> flat;
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    flat.resize(ml.layout(zo2::GroupIndex{g}).total_elements());
    engine.read_group(zo2::GroupIndex{g}, flat);
    h = zo2::replica_detail::hash_bytes(h + g, reinterpret_cast<const unsigned char*>(flat.data()),
                                        flat.size() * sizeof(float));
  }
  return h;
}

constexpr double kDefaultTimeoutS = 300;
constexpr std::uint64_t kDefaultReplicaCheck = 1000;
/// The longest wait for a rank that is legitimately busy alone: loading the model at start-up,
/// rank 0 writing a checkpoint.
constexpr double kSlowWaitS = 3600;

/// Ranks a launcher says this process belongs to (0: no launcher).
int launcher_size() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
    if (const char* v = std::getenv(var)) return std::atoi(v);
  return 0;
}

/// The step's communicator as the optimizer sees it: the transport with the run's timeout, or a
/// longer one for the next call only (after a checkpoint, which rank 0 writes alone).
class TimedComm final : public zo2::Communicator {
 public:
  using Reduce = std::function<void(std::span<double>, zo2::CommSeconds)>;
  TimedComm(int rank, int size, zo2::CommSeconds timeout, Reduce reduce)
      : rank_(rank), size_(size), timeout_(timeout), reduce_(std::move(reduce)) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(std::span<double> values) override {
    const zo2::CommSeconds t = next_.count() > 0 ? next_ : timeout_;
    next_ = zo2::CommSeconds(0);
    const auto t0 = std::chrono::steady_clock::now();
    reduce_(values, t);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    seconds_ += s;
    longest_ = std::max(longest_, s);
    ++calls_;
  }
  void wait_longer_next(zo2::CommSeconds t) { next_ = std::max(t, timeout_); }
  /// Time spent in reductions (the transport plus waiting for the slowest rank).
  double seconds() const { return seconds_; }
  double longest() const { return longest_; }
  std::uint64_t calls() const { return calls_; }

 private:
  int rank_, size_;
  zo2::CommSeconds timeout_, next_{0};
  Reduce reduce_;
  double seconds_ = 0, longest_ = 0;
  std::uint64_t calls_ = 0;
};

/// Set when a data-parallel run ends by an exception: at exit (after main has printed the
/// error) the other ranks are aborted instead of left waiting for this one.
bool g_failed_parallel = false;

}  // namespace

void add_data_parallel_options(CommandSpec& spec) {
  spec.options.push_back({"--data-parallel", "MODE",
                          "under mpirun -np N: batch (each rank its slice of every batch of --batch examples) or queries "
                          "(each rank the whole batch and --queries/N of the queries); same trajectory as one process",
                          "batch"});
  spec.options.push_back({"--host-master", "MODE",
                          "under mpirun with --offload: shared (the ranks of one host hold ONE pinned host master in "
                          "shared memory; its first rank loads and writes it back) or per-rank (each rank its own copy)",
                          "shared"});
  spec.options.push_back({"--comm-timeout", "S",
                          "under mpirun: a rank that does not reach a step's reduction within S seconds of the others "
                          "ends the run with an error",
                          "300"});
  spec.options.push_back({"--replica-check", "N",
                          "under mpirun: compare a hash of every rank's parameters every N steps (and at checkpoints and "
                          "the end; 0: only there)",
                          "1000"});
}

bool data_parallel_built() {
#if defined(ZO2_HAVE_MPI)
  return true;
#else
  return false;
#endif
}

struct DataParallelRun::Impl {
#if defined(ZO2_HAVE_MPI)
  std::optional<zo2::MpiSession> session;  // first member: finalized last
  std::unique_ptr<zo2::MpiCommunicator> mpi;
#endif
#if defined(ZO2_HAVE_NCCL)
  std::unique_ptr<zo2::NcclCommunicator> nccl;
#endif
  std::unique_ptr<TimedComm> comm;
  int rank = 0, size = 1, local_rank = 0, local_size = 1;
  zo2::DataParallel mode = zo2::DataParallel::kBatch;
  zo2::CommSeconds timeout{kDefaultTimeoutS};
  std::uint64_t replica_every = kDefaultReplicaCheck;
  std::string transport = "none";
  bool share_host_master = true;  // --host-master shared
  std::string host_master_name;   // the same on every rank of this host
  int exceptions = 0;
};

DataParallelRun::DataParallelRun(const Args& args, const std::string& device) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  (void)device;
  m.exceptions = std::uncaught_exceptions();
  const std::string mode = args.str("--data-parallel", "batch");
  if (mode == "batch") m.mode = zo2::DataParallel::kBatch;
  else if (mode == "queries") m.mode = zo2::DataParallel::kQueries;
  else throw UsageError(args.command() + ": --data-parallel must be batch or queries, got '" + mode + "'");
  const double timeout = args.number("--comm-timeout", kDefaultTimeoutS);
  if (!(timeout > 0) || timeout > 1e6) throw UsageError(args.command() + ": --comm-timeout must be in (0, 1e6] seconds");
  m.timeout = zo2::CommSeconds(timeout);
  m.replica_every = args.unsigned_integer("--replica-check", kDefaultReplicaCheck);
  const std::string host_master = args.str("--host-master", "shared");
  if (host_master != "shared" && host_master != "per-rank")
    throw UsageError(args.command() + ": --host-master must be shared or per-rank, got '" + host_master + "'");
  m.share_host_master = host_master == "shared";

  const int launched = launcher_size();
  if (launched <= 1) return;  // one process, as without a launcher
#if !defined(ZO2_HAVE_MPI)
  throw UsageError(args.command() + ": started by an MPI launcher with " + std::to_string(launched) +
                   " ranks, but this zo2-opt was built without MPI (install libopenmpi-dev and rebuild): "
                   "it would run " + std::to_string(launched) + " independent copies");
#else
  m.session.emplace();
  m.mpi = std::make_unique<zo2::MpiCommunicator>(MPI_COMM_WORLD, zo2::MpiOptions{m.timeout});
  m.rank = m.mpi->rank();
  m.size = m.mpi->size();
  {
    // The rank among its host's ranks: which GPU it takes.
    MPI_Comm local = MPI_COMM_NULL;
    zo2::mpi_detail::check(MPI_Comm_split_type(m.mpi->comm(), MPI_COMM_TYPE_SHARED, m.rank, MPI_INFO_NULL, &local),
                           "MPI_Comm_split_type");
    zo2::mpi_detail::check(MPI_Comm_rank(local, &m.local_rank), "MPI_Comm_rank");
    zo2::mpi_detail::check(MPI_Comm_size(local, &m.local_size), "MPI_Comm_size");
    // The name of this host's shared host master: its first rank picks one no other job uses.
    char name[64] = {};
    if (m.local_rank == 0)
      std::snprintf(name, sizeof name, "/zo2-master-%ld-%llx", static_cast<long>(getpid()),
                    static_cast<unsigned long long>(std::chrono::steady_clock::now().time_since_epoch().count()));
    zo2::mpi_detail::check(MPI_Bcast(name, sizeof name, MPI_CHAR, 0, local), "MPI_Bcast");
    m.host_master_name = name;
    MPI_Comm_free(&local);
  }
  if (m.rank != 0 && !std::freopen("/dev/null", "w", stdout))
    throw zo2::Error("rank " + std::to_string(m.rank) + ": cannot discard stdout");
  std::atexit([] {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (g_failed_parallel && initialized && !finalized) {
      std::fflush(stdout);
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  });

  const char* forced = std::getenv("ZO2_DP_TRANSPORT");
  const std::string wanted = forced ? forced : "";
  if (!wanted.empty() && wanted != "mpi" && wanted != "nccl")
    throw UsageError("ZO2_DP_TRANSPORT must be mpi or nccl, got '" + wanted + "'");
  m.transport = "mpi";
  bool gpus_shared = false;  // ranks of this host outnumber its GPUs (ZO2_DP_SHARE_GPUS=1)
  if (device == "cuda") {
#if defined(ZO2_OPT_CUDA)
    int count = 0;
    const cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess) throw zo2::Error(std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(rc));
    // ZO2_DP_SHARE_GPUS=1 lets ranks share GPUs (rank r on GPU r mod count): for tests on a
    // one-GPU machine, never faster.
    const char* share = std::getenv("ZO2_DP_SHARE_GPUS");
    const bool share_gpus = share && std::string(share) == "1";
    if (m.local_size > count && !share_gpus)
      throw UsageError(args.command() + ": " + std::to_string(m.local_size) + " ranks on this host but " +
                       std::to_string(count) + " CUDA GPU(s): one GPU per rank");
    gpus_shared = m.local_size > count;
    const int gpu = count > 0 ? m.local_rank % count : 0;
    const cudaError_t set = cudaSetDevice(gpu);
    if (set != cudaSuccess)
      throw zo2::Error("rank " + std::to_string(m.rank) + ": cudaSetDevice(" + std::to_string(gpu) +
                       ") failed: " + cudaGetErrorString(set));
#endif
#if defined(ZO2_HAVE_NCCL)
    // NCCL refuses two ranks on one GPU: ranks that share GPUs reduce over MPI.
    if (wanted != "mpi" && !gpus_shared) {
      m.nccl = std::make_unique<zo2::NcclCommunicator>(m.mpi->comm(), m.local_rank, zo2::NcclOptions{m.timeout});
      m.transport = "nccl";
    }
#endif
  }
  (void)gpus_shared;  // read only where NCCL is built
  if (wanted == "nccl" && m.transport != "nccl")
    throw UsageError("ZO2_DP_TRANSPORT=nccl: NCCL carries only --device cuda reductions, in a build with NCCL");
#if defined(ZO2_HAVE_NCCL)
  if (m.nccl) {
    zo2::NcclCommunicator* nccl = m.nccl.get();
    m.comm = std::make_unique<TimedComm>(m.rank, m.size, m.timeout,
                                         [nccl](std::span<double> v, zo2::CommSeconds t) { nccl->all_reduce_sum(v, t); });
  }
#endif
  if (!m.comm) {
    zo2::MpiCommunicator* mpi = m.mpi.get();
    m.comm = std::make_unique<TimedComm>(m.rank, m.size, m.timeout,
                                         [mpi](std::span<double> v, zo2::CommSeconds t) { mpi->all_reduce_sum(v, t); });
  }
#endif
}

DataParallelRun::~DataParallelRun() {
  if (!impl_ || impl_->size <= 1) return;
  if (std::uncaught_exceptions() > impl_->exceptions) {
    // Failing: the others may be waiting in a collective. Leave the transports as they are
    // (freeing them could wait for ranks that never come) and abort the job at exit.
    g_failed_parallel = true;
#if defined(ZO2_HAVE_NCCL)
    (void)impl_->nccl.release();
#endif
#if defined(ZO2_HAVE_MPI)
    (void)impl_->mpi.release();
#endif
  }
}

int DataParallelRun::rank() const { return impl_->rank; }
int DataParallelRun::size() const { return impl_->size; }

std::optional<EngineOptions::SharedMaster> DataParallelRun::shared_host_master() const {
  const Impl& m = *impl_;
  if (m.size <= 1 || m.local_size <= 1 || !m.share_host_master) return std::nullopt;
  return EngineOptions::SharedMaster{m.host_master_name, static_cast<std::size_t>(m.local_rank),
                                     static_cast<std::size_t>(m.local_size), std::max(kSlowWaitS, m.timeout.count())};
}

void DataParallelRun::attach(Engine& engine, const zo2::ZOConfig& zo, std::uint64_t batch_size, std::uint64_t /*accumulate*/) {
  Impl& m = *impl_;
  if (m.size <= 1) return;
  const std::string n = std::to_string(m.size);
  if (m.mode == zo2::DataParallel::kBatch && batch_size < static_cast<std::uint64_t>(m.size))
    throw UsageError("train: --batch " + std::to_string(batch_size) + " is smaller than the " + n +
                     " ranks: with --data-parallel batch every rank takes a slice of each batch");
  if (m.mode == zo2::DataParallel::kQueries && zo.queries % static_cast<unsigned>(m.size) != 0)
    throw UsageError("train: --data-parallel queries: --queries " + std::to_string(zo.queries) +
                     " must be a multiple of the " + n + " ranks");
  try {
    engine.set_communicator(m.comm.get(), m.mode);
  } catch (const zo2::ConfigError& e) {
    throw UsageError(std::string("train: data-parallel over ") + n + " ranks: " + e.what());
  }
  // Every rank has loaded its model and data: the first step's reduction need not wait for a
  // slow start-up.
#if defined(ZO2_HAVE_MPI)
  m.mpi->barrier(zo2::CommSeconds(std::max(kSlowWaitS, m.timeout.count())));
#endif
  engine.every_rank_ready();
  // Start-up is over: a partner stalled on the shared host master is an error after the timeout.
  engine.set_partner_wait(m.timeout.count());
  const std::uint64_t per_rank = batch_size / static_cast<std::uint64_t>(m.size);
  std::printf("parallel  %d ranks over %s (%d on this host), data-parallel %s: %s, replica check every %llu steps, "
              "timeout %g s\n",
              m.size, m.transport == "nccl" ? "NCCL" : "MPI", m.local_size,
              m.mode == zo2::DataParallel::kBatch ? "batch" : "queries",
              m.mode == zo2::DataParallel::kBatch
                  ? (std::to_string(per_rank) + (batch_size % static_cast<std::uint64_t>(m.size) ? "-" + std::to_string(per_rank + 1) : "") +
                     " of every " + std::to_string(batch_size) + " examples per rank")
                        .c_str()
                  : (std::to_string(zo.queries / static_cast<unsigned>(m.size)) + " of " + std::to_string(zo.queries) +
                     " queries per rank, the whole batch")
                        .c_str(),
              static_cast<unsigned long long>(m.replica_every), m.timeout.count());
  std::fflush(stdout);
}

std::vector<std::size_t> DataParallelRun::shard(std::vector<std::size_t> indices) const {
  const Impl& m = *impl_;
  if (m.size <= 1 || m.mode != zo2::DataParallel::kBatch) return indices;
  const std::size_t n = indices.size(), r = static_cast<std::size_t>(m.rank), s = static_cast<std::size_t>(m.size);
  const std::size_t from = n * r / s, to = n * (r + 1) / s;
  return std::vector<std::size_t>(indices.begin() + static_cast<std::ptrdiff_t>(from),
                                  indices.begin() + static_cast<std::ptrdiff_t>(to));
}

std::size_t DataParallelRun::tokens(const Dataset& data, std::span<const std::size_t> indices) {
  std::size_t n = 0;
  for (const std::size_t i : indices) n += data.examples.at(i).ids.size();
  return n;
}

void DataParallelRun::after_step(Engine& engine, std::uint64_t steps_done, std::uint64_t total_steps,
                                 std::uint64_t checkpoint_every) {
  Impl& m = *impl_;
  if (m.size <= 1) return;
  const bool checkpoint = checkpoint_every && steps_done % checkpoint_every == 0;
  const bool last = steps_done == total_steps;
  // A host master shared with rank 0 (seat 0): while it writes a checkpoint the others may wait
  // on it as long as on the reduction after it; otherwise the step's timeout.
  engine.set_partner_wait(checkpoint && !last ? std::max(kSlowWaitS, m.timeout.count()) : m.timeout.count());
  if (!(checkpoint || last || (m.replica_every && steps_done % m.replica_every == 0))) return;
  const std::uint64_t hash = parameter_hash(engine);
  zo2::check_replicas(*m.comm, hash, steps_done);
  if (checkpoint && !last && m.rank != 0) m.comm->wait_longer_next(zo2::CommSeconds(kSlowWaitS));
  if (last && m.rank == 0) {
    char h[24];
    std::snprintf(h, sizeof h, "%016llx", static_cast<unsigned long long>(hash));
    std::printf("parallel  replicas identical on %d ranks after step %llu (parameter hash %s); rank 0 spent %.3f ms "
                "in %llu reductions (mean %.1f us, longest %.1f us: the transport and waiting for the slowest rank)\n",
                m.size, static_cast<unsigned long long>(steps_done), h, 1e3 * m.comm->seconds(),
                static_cast<unsigned long long>(m.comm->calls()),
                m.comm->calls() ? 1e6 * m.comm->seconds() / static_cast<double>(m.comm->calls()) : 0.0,
                1e6 * m.comm->longest());
    std::fflush(stdout);
  }
}

}  // namespace zo2_opt
