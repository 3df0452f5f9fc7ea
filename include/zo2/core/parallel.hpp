// zo2/core/parallel.hpp -- parallel_for over an index range on the host's cores, for the few
// host loops that touch a whole model at once (encoding it into the offload engine's pinned
// memory at start-up, decoding it for a checkpoint). Plain std::thread: no pool outlives the
// call, and the first exception a worker throws is rethrown in the caller after all joined.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace zo2 {

/// Runs fn(i) for every i in [0, n), each exactly once, on up to `threads` threads (0: the
/// hardware's concurrency). Items are taken one at a time, so uneven items balance.
template <class F>
void parallel_for(std::size_t n, F&& fn, unsigned threads = 0) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  const std::size_t workers = std::min<std::size_t>(threads, n);
  if (workers <= 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first;
  std::mutex first_mutex;
  const auto work = [&] {
    for (std::size_t i; !failed.load(std::memory_order_relaxed) && (i = next.fetch_add(1)) < n;) {
      try {
        fn(i);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(first_mutex);
        if (!first) first = std::current_exception();
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace zo2
