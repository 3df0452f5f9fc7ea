// zo2/core/communicator.hpp -- what data-parallel ZO needs from a transport: the scalars of a
// step summed over ranks.
//
// Every rank draws the same z from the same seed, so replicas stay identical by applying the
// same update; only the losses (and their weights) cross. ZOOptimizer::set_communicator takes
// any implementation: SingleProcess here, MPI and NCCL ones where the build has them.
#pragma once

#include <span>

namespace zo2 {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Element-wise sum over all ranks, in place: every rank ends with the same values. Throws
  /// (naming the transport) when a rank fails or does not answer in time.
  virtual void all_reduce_sum(std::span<double> values) = 0;
};

/// One process: the sum is the values themselves.
class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(std::span<double>) override {}
};

/// How ranks share a step's work.
enum class DataParallel {
  kBatch,    // each rank its shard of the batch, the same queries; losses token-weighted
  kQueries,  // each rank the same batch, its own queries (rank r takes r, r + N, ...)
};

}  // namespace zo2
