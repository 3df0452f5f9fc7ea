// zo2/comm/nccl.hpp -- zo2::Communicator over NCCL, for one GPU per rank: a step's scalars are
// summed by ncclAllReduce on a stream of the communicator's own. Needs <nccl.h> and the CUDA
// runtime: link zo2::nccl in CMake (defined where NCCL is found; it defines ZO2_HAVE_NCCL and,
// with MPI, ZO2_HAVE_MPI).
//
//   zo2::MpiSession mpi;
//   cudaSetDevice(local_rank);                                 // the rank's GPU
//   zo2::NcclCommunicator comm(MPI_COMM_WORLD, local_rank);    // unique id via MPI_Bcast
//   optimizer.set_communicator(&comm);
//
// NVLink multicast stays off: the constructor sets NCCL_NVLS_ENABLE=0 before NCCL initializes
// (NVLS can put a host's GPUs, shared with others, out of service). Every CUDA and NCCL status
// is checked and turned into a zo2::CommError naming the call. The communicator is non-blocking
// (ncclConfig_t::blocking = 0): initialization and every all-reduce are polled, with
// ncclCommGetAsyncError, against a deadline; a rank that died or hangs makes the others abort
// the communicator (ncclCommAbort, which also frees the GPU from the stuck kernel) and throw.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <span>
#include <string>

#include <zo2/comm/comm_error.hpp>
#include <zo2/core/communicator.hpp>

#if defined(ZO2_HAVE_MPI)
#include <zo2/comm/mpi.hpp>
#endif

namespace zo2 {

namespace nccl_detail {

inline void check_cuda(cudaError_t rc, const char* call, int rank) {
  if (rc == cudaSuccess) return;
  throw CommError(std::string(call) + " failed on rank " + std::to_string(rank) + ": " + cudaGetErrorString(rc));
}

inline std::string nccl_text(ncclResult_t rc, ncclComm_t comm) {
  std::string t = ncclGetErrorString(rc);
  if (comm) {
    const char* last = ncclGetLastError(comm);
    if (last && *last) t += " (" + std::string(last) + ")";
  }
  return t;
}

/// NCCL_NVLS_ENABLE=0, whatever the environment said: must run before NCCL initializes.
inline void disable_nvls() { ::setenv("NCCL_NVLS_ENABLE", "0", 1); }

}  // namespace nccl_detail

struct NcclOptions {
  /// How long initialization and each all-reduce wait for every rank; zero or less: forever.
  CommSeconds timeout{300.0};
};

class NcclCommunicator final : public Communicator {
 public:
  /// Rank `rank` of `size` on CUDA device `device`; every rank passes the same id (from
  /// ncclGetUniqueId on one rank, shared by any means).
  NcclCommunicator(const ncclUniqueId& id, int rank, int size, int device, NcclOptions options = {})
      : options_(options), rank_(rank), size_(size), device_(device) {
    init(id);
  }

#if defined(ZO2_HAVE_MPI)
  /// Rank and size from `bootstrap`; rank 0's unique id reaches the others by MPI_Bcast.
  NcclCommunicator(MPI_Comm bootstrap, int device, NcclOptions options = {}) : options_(options), device_(device) {
    mpi_detail::check(MPI_Comm_rank(bootstrap, &rank_), "MPI_Comm_rank");
    mpi_detail::check(MPI_Comm_size(bootstrap, &size_), "MPI_Comm_size");
    ncclUniqueId id{};
    if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    mpi_detail::check(MPI_Bcast(&id, static_cast<int>(sizeof id), MPI_BYTE, 0, bootstrap), "MPI_Bcast of the NCCL unique id");
    init(id);
  }
#endif

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  ~NcclCommunicator() override {
    if (comm_) {
      if (failed_) {
        ncclCommAbort(comm_);
      } else {
        // Flush, wait (bounded), destroy; abort when the flush does not finish.
        ncclResult_t state = ncclCommFinalize(comm_);
        const bool flushed = (state == ncclSuccess || state == ncclInProgress) &&
                             comm_detail::poll_until(
                                 [&] {
                                   if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) return true;
                                   return state != ncclInProgress;
                                 },
                                 options_.timeout) &&
                             state == ncclSuccess;
        if (flushed) ncclCommDestroy(comm_);
        else ncclCommAbort(comm_);
      }
    }
    if (done_) cudaEventDestroy(done_);
    if (stream_) cudaStreamDestroy(stream_);
    if (device_buffer_) cudaFree(device_buffer_);
    if (host_buffer_) cudaFreeHost(host_buffer_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }
  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }
  void set_timeout(CommSeconds timeout) { options_.timeout = timeout; }

  /// Element-wise sum over the ranks, in place: host -> device, ncclAllReduce (ncclDouble,
  /// ncclSum), device -> host on the communicator's stream, polled against the timeout. (One
  /// rank takes the same path: a single-GPU check of the transport.)
  void all_reduce_sum(std::span<double> values) override { all_reduce_sum(values, options_.timeout); }

  void all_reduce_sum(std::span<double> values, CommSeconds timeout) {
    if (failed_)
      throw CommError("ncclAllReduce on rank " + std::to_string(rank_) +
                      ": the communicator is unusable, an earlier operation failed or timed out");
    if (values.empty()) return;
    reserve(values.size());
    const std::size_t bytes = values.size() * sizeof(double);
    std::memcpy(host_buffer_, values.data(), bytes);
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_cuda(cudaMemcpyAsync(device_buffer_, host_buffer_, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    ncclResult_t rc = ncclAllReduce(device_buffer_, device_buffer_, values.size(), ncclDouble, ncclSum, comm_, stream_);
    if (rc != ncclSuccess && rc != ncclInProgress) fail(rc, "ncclAllReduce");
    if (rc == ncclInProgress) settle("ncclAllReduce (enqueue)", timeout);
    check_cuda(cudaMemcpyAsync(host_buffer_, device_buffer_, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    check_cuda(cudaEventRecord(done_, stream_), "cudaEventRecord");
    cudaError_t query = cudaSuccess;
    ncclResult_t async = ncclSuccess;
    const bool completed = comm_detail::poll_until(
        [&] {
          query = cudaEventQuery(done_);
          if (query != cudaErrorNotReady) return true;
          if (ncclCommGetAsyncError(comm_, &async) != ncclSuccess || (async != ncclSuccess && async != ncclInProgress))
            return true;
          return false;
        },
        timeout);
    if (!completed) timed_out("ncclAllReduce of " + std::to_string(values.size()) + " doubles", timeout);
    if (async != ncclSuccess && async != ncclInProgress) fail(async, "ncclAllReduce (asynchronous error)");
    check_cuda(query, "cudaEventQuery after ncclAllReduce");
    std::memcpy(values.data(), host_buffer_, bytes);
  }

 private:
  void init(const ncclUniqueId& id) {
    if (size_ < 1 || rank_ < 0 || rank_ >= size_)
      throw CommError("NcclCommunicator: rank " + std::to_string(rank_) + " of " + std::to_string(size_) + " is not a rank");
    nccl_detail::disable_nvls();
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    reserve(64);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t rc = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    if (rc != ncclSuccess && rc != ncclInProgress) fail(rc, "ncclCommInitRankConfig");
    settle("ncclCommInitRankConfig", options_.timeout);
  }

  /// Polls the communicator's state until it is no longer ncclInProgress.
  void settle(const char* what, CommSeconds timeout) {
    ncclResult_t state = ncclInProgress;
    const bool completed = comm_detail::poll_until(
        [&] {
          const ncclResult_t rc = ncclCommGetAsyncError(comm_, &state);
          if (rc != ncclSuccess) state = rc;
          return state != ncclInProgress;
        },
        timeout);
    if (!completed) timed_out(what, timeout);
    if (state != ncclSuccess) fail(state, what);
  }

  void reserve(std::size_t n) {
    if (n <= capacity_) return;
    if (device_buffer_) check_cuda(cudaFree(device_buffer_), "cudaFree");
    if (host_buffer_) check_cuda(cudaFreeHost(host_buffer_), "cudaFreeHost");
    device_buffer_ = nullptr;
    host_buffer_ = nullptr;
    capacity_ = 0;
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_cuda(cudaMalloc(&device_buffer_, n * sizeof(double)), "cudaMalloc");
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_buffer_), n * sizeof(double), cudaHostAllocDefault),
               "cudaHostAlloc");
    capacity_ = n;
  }

  void check(ncclResult_t rc, const char* call) {
    if (rc != ncclSuccess) fail(rc, call);
  }
  void check_cuda(cudaError_t rc, const char* call) { nccl_detail::check_cuda(rc, call, rank_); }

  [[noreturn]] void fail(ncclResult_t rc, const std::string& call) {
    const std::string text = nccl_detail::nccl_text(rc, comm_);
    failed_ = true;
    throw CommError(call + " failed on rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ": " + text);
  }

  [[noreturn]] void timed_out(const std::string& what, CommSeconds timeout) {
    failed_ = true;
    if (comm_) ncclCommAbort(comm_);  // also ends the kernel waiting for the missing rank
    comm_ = nullptr;
    throw CommError("NCCL: " + what + " on rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
                    " timed out: not every rank answered within " + comm_detail::seconds_text(timeout) +
                    " (a rank died, hangs, or is slower than the timeout allows)");
  }

  NcclOptions options_;
  int rank_ = 0, size_ = 1, device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  double* device_buffer_ = nullptr;
  double* host_buffer_ = nullptr;
  std::size_t capacity_ = 0;
  bool failed_ = false;
};

}  // namespace zo2
