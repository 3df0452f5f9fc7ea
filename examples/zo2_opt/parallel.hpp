// zo2-opt: data-parallel training over MPI ranks (`mpirun -np N zo2-opt train ...`).
//
// Launched by mpirun (or another MPI launcher) with N > 1 ranks, train runs N replicas of the
// model: every rank draws the same z from the same seed and applies the same update, and only
// the step's losses cross (zo2::ZOOptimizer::set_communicator):
//   --data-parallel batch    (default) rank r takes its contiguous slice of every micro-batch of
//                            the global batch (the schedule is global: the same example indices
//                            as one process), so the step is the single-process step on the same
//                            global batch, to rounding, at 1/N of the work per rank;
//   --data-parallel queries  every rank takes the whole batch and its share of the --queries.
// On the CPU the reduction is an MPI all-reduce; with --device cuda rank -> local GPU (its rank
// among the ranks of its host) and NCCL carries it where the build has NCCL (MPI otherwise;
// ZO2_DP_TRANSPORT=mpi forces MPI). Rank 0 alone prints, logs, checkpoints and exports; the
// others evaluate in lockstep (their results are rank 0's, so no rank waits for another's
// evaluation), discard their stdout and print on stderr only errors and --eval-every's notes. Each
// process keeps its own copy of the model on its GPU; offloaded, the ranks of one host share ONE
// pinned host master in POSIX shared memory (--host-master shared, the default: the host's first
// rank loads it and alone writes blocks back, zo2::gpu::SharedHostMaster), so host memory does
// not grow with the GPUs (--host-master per-rank: each rank its own). Every
// --replica-check steps, at each checkpoint and at the end, a hash of every rank's parameters is
// compared across ranks; a difference stops the run naming the step. A rank that does not reach
// a reduction within --comm-timeout seconds of the others makes them exit with an error; a rank
// that fails exits non-zero, and MPI's launcher ends the others.
//
// Without a launcher, or in a build without MPI, the program runs in one process as before (a
// build without MPI refuses to run under a launcher with N > 1, rather than run N copies).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <zo2/core/communicator.hpp>
#include <zo2/core/config.hpp>

#include "cli.hpp"
#include "data.hpp"
#include "engine.hpp"

namespace zo2_opt {

class Engine;

/// Adds train's --data-parallel, --comm-timeout and --replica-check to `spec`.
void add_data_parallel_options(CommandSpec& spec);

/// Whether this build can train data-parallel (it has MPI).
bool data_parallel_built();

class DataParallelRun {
 public:
  /// Starts MPI when a launcher started this process with more than one rank (and, with
  /// --device cuda, selects the rank's GPU); otherwise one process. Non-root ranks' stdout is
  /// discarded from here on.
  DataParallelRun(const Args& args, const std::string& device);
  ~DataParallelRun();
  DataParallelRun(const DataParallelRun&) = delete;
  DataParallelRun& operator=(const DataParallelRun&) = delete;

  int rank() const;
  int size() const;
  /// Rank 0 (or the only process): the one that prints, logs, checkpoints and exports.
  bool root() const { return rank() == 0; }

  /// With --offload under mpirun, several ranks on this host and --host-master shared: the
  /// host's shared master (its name, this rank's seat, the host's ranks, the wait for a partner);
  /// otherwise none.
  std::optional<EngineOptions::SharedMaster> shared_host_master() const;

  /// Hands the engine the step's communicator (N > 1), after checking that the batch and the
  /// queries split over the ranks, and waits until every rank is ready.
  void attach(Engine& engine, const zo2::ZOConfig& zo, std::uint64_t batch_size, std::uint64_t accumulate);

  /// This rank's share of a micro-batch's example indices (batch mode: a contiguous slice;
  /// queries mode, or one process: all of them).
  std::vector<std::size_t> shard(std::vector<std::size_t> indices) const;

  /// Real tokens of the micro-batch `indices` (all ranks' shards together): the step's tokens.
  static std::size_t tokens(const Dataset& data, std::span<const std::size_t> indices);

  /// After `steps_done` steps: compares the replicas (a collective on every rank) every
  /// --replica-check steps, at each checkpoint step and at the last step; throws
  /// zo2::ReplicaDivergence naming the step when they differ. On a checkpoint step the other
  /// ranks' next reduction waits longer (rank 0 is writing).
  void after_step(Engine& engine, std::uint64_t steps_done, std::uint64_t total_steps, std::uint64_t checkpoint_every);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace zo2_opt
