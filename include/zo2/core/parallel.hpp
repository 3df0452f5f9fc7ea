// zo2/core/parallel.hpp -- parallel_for over an index range on the host's cores, for the few
// host loops that touch a whole model at once (encoding it into the offload engine's pinned
// memory at start-up, decoding it for a checkpoint), and the pieces such a loop cuts a group's
// tensors into. Plain std::thread: no pool outlives the call, and the first exception a worker
// throws is rethrown in the caller after all joined.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <exception>
#include <mutex>
#include <span>
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

/// One piece of an item's range (tensor `item`'s elements [begin, end)): the unit of work when
/// host code spreads a group's tensors over the cores (see cut_into_pieces).
struct Piece {
  std::size_t item, begin, end;
};

/// Cuts items 0..n-1 (item i has size_of(i) units, grouped in indivisible runs of unit_of(i) >= 1,
/// e.g. a tensor's rows) into pieces of about `target` units, in order: every piece's begin is a
/// multiple of its item's unit, and the pieces of an item tile its range. Empty items give none.
template <class SizeOf, class UnitOf>
std::vector<Piece> cut_into_pieces(std::size_t n, SizeOf&& size_of, UnitOf&& unit_of, std::size_t target) {
  std::vector<Piece> pieces;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t size = size_of(i), unit = std::max<std::size_t>(1, unit_of(i));
    const std::size_t step = std::max<std::size_t>(1, target / unit) * unit;
    for (std::size_t b = 0; b < size; b += step) pieces.push_back(Piece{i, b, std::min(size, b + step)});
  }
  return pieces;
}

/// Threads for host work over `elements` values: all cores for a large group, one for a small
/// one (where starting threads would cost more than the work).
inline unsigned threads_for(std::size_t elements) {
  constexpr std::size_t kParallelFrom = std::size_t{1} << 22;
  return elements >= kParallelFrom ? 0u : 1u;
}

/// Sets `bytes` to `value` on all cores when it is large (a pinned block of a large model).
inline void parallel_fill(std::span<unsigned char> bytes, unsigned char value) {
  constexpr std::size_t kPiece = std::size_t{16} << 20;
  parallel_for(
      (bytes.size() + kPiece - 1) / kPiece,
      [&](std::size_t i) {
        const std::size_t b = i * kPiece, e = std::min(bytes.size(), b + kPiece);
        std::memset(bytes.data() + b, value, e - b);
      },
      threads_for(bytes.size()));
}

}  // namespace zo2
