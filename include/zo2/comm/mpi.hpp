// zo2/comm/mpi.hpp -- zo2::Communicator over MPI: the CPU path's reductions, and the launcher
// and bootstrap of the NCCL one (comm/nccl.hpp). Needs <mpi.h> and an MPI library: link
// zo2::mpi in CMake (defined where find_package(MPI) succeeds; it also defines ZO2_HAVE_MPI).
//
//   zo2::MpiSession mpi;                          // MPI_Init_thread unless already initialized
//   zo2::MpiCommunicator comm(MPI_COMM_WORLD);    // works on a duplicate of the communicator
//   optimizer.set_communicator(&comm, zo2::DataParallel::kBatch);
//
// Every MPI call's status is checked (the communicator's error handler is MPI_ERRORS_RETURN)
// and a failure is a zo2::CommError naming the call and the rank. all_reduce_sum starts an
// MPI_Iallreduce and polls it against a deadline: a rank that died or hangs makes the others
// throw after the timeout instead of waiting forever. MPI cannot cancel a collective, so after a
// timeout the operation is abandoned (its buffer stays owned by the communicator), further
// calls throw, and the process should end (zo2-opt exits non-zero; the launcher then ends the
// other ranks) or MPI_Abort.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <span>
#include <string>
#include <vector>

#include <zo2/comm/comm_error.hpp>
#include <zo2/core/communicator.hpp>

namespace zo2 {

namespace mpi_detail {

inline std::string error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(len));
}

inline int world_rank() {
  int initialized = 0, finalized = 0, rank = -1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

/// Throws CommError naming `call` when `code` is not MPI_SUCCESS.
inline void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  const int rank = world_rank();
  throw CommError(std::string(call) + " failed" + (rank >= 0 ? " on rank " + std::to_string(rank) : std::string()) +
                  ": " + error_text(code));
}

}  // namespace mpi_detail

/// Initializes MPI for the process's lifetime (MPI_THREAD_FUNNELED: only the thread that made
/// the session calls MPI) unless it already is, and finalizes it on destruction if it
/// initialized it. A session destroyed by an exception does not finalize (MPI_Finalize would
/// wait for ranks that may never come); the process then exits without it, which MPI launchers
/// treat as a failure of the job.
class MpiSession {
 public:
  MpiSession() : MpiSession(nullptr, nullptr) {}
  MpiSession(int* argc, char*** argv) : exceptions_(std::uncaught_exceptions()) {
    int initialized = 0;
    mpi_detail::check(MPI_Initialized(&initialized), "MPI_Initialized");
    if (initialized) return;
    int provided = 0;
    mpi_detail::check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owner_ = true;
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    if (!owner_ || std::uncaught_exceptions() > exceptions_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }

  /// Whether this session called MPI_Init_thread (false: MPI was initialized elsewhere).
  bool owner() const { return owner_; }

  /// Whether an MPI launcher started this process (mpirun/mpiexec of Open MPI, MPICH, Intel MPI,
  /// or a PMIx/PMI-based one such as srun), from the environment it sets; and with how many
  /// ranks (0 when it says not).
  static int launched_size() {
    for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"}) {
      if (const char* v = std::getenv(var)) return std::atoi(v);
    }
    if (std::getenv("PMIX_RANK") || std::getenv("PMI_RANK")) return 1;
    return 0;
  }

 private:
  int exceptions_;
  bool owner_ = false;
};

struct MpiOptions {
  /// How long all_reduce_sum and barrier wait for every rank before they throw; zero or less:
  /// forever.
  CommSeconds timeout{300.0};
};

/// zo2::Communicator over an MPI communicator (a duplicate of it: zo2's collectives never match
/// the caller's). Not thread-safe: call it from one thread.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD, MpiOptions options = {}) : options_(options) {
    mpi_detail::check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    mpi_detail::check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    mpi_detail::check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    mpi_detail::check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // An abandoned operation still references the communicator and the buffer: leave both.
    if (!finalized && !abandoned_ && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm comm() const { return comm_; }
  const MpiOptions& options() const { return options_; }
  void set_timeout(CommSeconds timeout) { options_.timeout = timeout; }

  /// Element-wise sum over the ranks, in place (MPI_Iallreduce of doubles, polled against the
  /// timeout).
  void all_reduce_sum(std::span<double> values) override { all_reduce_sum(values, options_.timeout); }

  /// The same with a timeout of its own (e.g. a longer one while rank 0 writes a checkpoint).
  void all_reduce_sum(std::span<double> values, CommSeconds timeout) {
    usable("MPI_Iallreduce");
    if (size_ == 1 || values.empty()) return;
    buffer_.assign(values.begin(), values.end());
    mpi_detail::check(MPI_Iallreduce(MPI_IN_PLACE, buffer_.data(), static_cast<int>(buffer_.size()), MPI_DOUBLE,
                                     MPI_SUM, comm_, &request_),
                      "MPI_Iallreduce");
    wait("MPI_Iallreduce of " + std::to_string(values.size()) + " doubles", timeout);
    std::copy(buffer_.begin(), buffer_.end(), values.begin());
  }

  /// Waits until every rank has called barrier (MPI_Ibarrier, polled against the timeout).
  void barrier() { barrier(options_.timeout); }
  void barrier(CommSeconds timeout) {
    usable("MPI_Ibarrier");
    if (size_ == 1) return;
    mpi_detail::check(MPI_Ibarrier(comm_, &request_), "MPI_Ibarrier");
    wait("MPI_Ibarrier", timeout);
  }

  /// Whether an operation was abandoned after its timeout (the communicator is then unusable
  /// until finish_abandoned() returns true).
  bool abandoned() const { return abandoned_; }

  /// Waits up to `wait` more for the abandoned operation (a rank that was late but alive);
  /// true when it completed and the communicator is usable again.
  bool finish_abandoned(CommSeconds wait) {
    if (!abandoned_) return true;
    int done = 0;
    const bool completed = comm_detail::poll_until(
        [&] {
          mpi_detail::check(MPI_Test(&request_, &done, MPI_STATUS_IGNORE), "MPI_Test");
          return done != 0;
        },
        wait);
    if (completed) abandoned_ = false;
    return completed;
  }

 private:
  void usable(const char* call) const {
    if (abandoned_)
      throw CommError(std::string(call) + " on rank " + std::to_string(rank_) +
                      ": the communicator is unusable, an earlier operation timed out and was abandoned");
  }

  void wait(const std::string& what, CommSeconds timeout) {
    int done = 0;
    const bool completed = comm_detail::poll_until(
        [&] {
          mpi_detail::check(MPI_Test(&request_, &done, MPI_STATUS_IGNORE), "MPI_Test");
          return done != 0;
        },
        timeout);
    if (completed) return;
    abandoned_ = true;
    throw CommError("MPI: " + what + " on rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
                    " timed out: not every rank answered within " + comm_detail::seconds_text(timeout) +
                    " (a rank died, hangs, or is slower than the timeout allows)");
  }

  MpiOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  MPI_Request request_ = MPI_REQUEST_NULL;
  std::vector<double> buffer_;  // the in-flight operation's data (kept while it is abandoned)
  bool abandoned_ = false;
};

}  // namespace zo2
