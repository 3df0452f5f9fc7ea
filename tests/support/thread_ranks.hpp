// Ranks as threads for data-parallel tests: ThreadRanks(n) hands out n Communicators whose
// all_reduce_sum waits for every rank's values and gives each the sum.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include <zo2/core/communicator.hpp>

namespace zo2_test {

class ThreadRanks {
 public:
  explicit ThreadRanks(int n) : n_(n) {}
  class Rank final : public zo2::Communicator {
   public:
    Rank(ThreadRanks* all, int r) : all_(all), r_(r) {}
    int rank() const override { return r_; }
    int size() const override { return all_->n_; }
    void all_reduce_sum(std::span<double> v) override { all_->reduce(v); }

   private:
    ThreadRanks* all_;
    int r_;
  };

 private:
  void reduce(std::span<double> v) {
    std::unique_lock<std::mutex> lock(m_);
    const std::uint64_t round = round_;
    if (arrived_ == 0) sums_.assign(v.size(), 0.0);
    for (std::size_t i = 0; i < v.size(); ++i) sums_[i] += v[i];
    if (++arrived_ == n_) {
      result_ = sums_;
      arrived_ = 0;
      ++round_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return round_ != round; });
    }
    std::copy(result_.begin(), result_.end(), v.begin());
  }
  int n_;
  std::mutex m_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t round_ = 0;
  std::vector<double> sums_, result_;
};

}  // namespace zo2_test
