// parallel_for (core/parallel.hpp): every index exactly once on any thread count, the first
// exception rethrown in the caller after all workers stopped.
#include <doctest/doctest.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <zo2/core/parallel.hpp>

TEST_CASE("parallel_for runs every index exactly once") {
  for (const unsigned threads : {0u, 1u, 3u, 64u}) {
    for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{1000}}) {
      CAPTURE(threads);
      CAPTURE(n);
      std::vector<std::atomic<int>> hits(n);
      zo2::parallel_for(n, [&](std::size_t i) { hits[i].fetch_add(1); }, threads);
      std::size_t once = 0;
      for (const auto& h : hits) once += h.load() == 1;
      CHECK(once == n);
    }
  }
}

TEST_CASE("parallel_for uses more than one thread when asked") {
  std::vector<std::thread::id> ids(64);
  std::atomic<int> started{0};
  zo2::parallel_for(ids.size(), [&](std::size_t i) {
    ids[i] = std::this_thread::get_id();
    // Hold the first items until a second worker has started, so one thread cannot take all.
    started.fetch_add(1);
    for (int spin = 0; started.load() < 2 && spin < 100000000; ++spin) std::this_thread::yield();
  }, 4);
  std::size_t distinct = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    bool seen = false;
    for (std::size_t k = 0; k < i && !seen; ++k) seen = ids[k] == ids[i];
    distinct += !seen;
  }
  CHECK(distinct >= 2);
}

TEST_CASE("parallel_for rethrows a worker's exception after joining") {
  std::atomic<int> ran{0};
  CHECK_THROWS_WITH_AS(zo2::parallel_for(100, [&](std::size_t i) {
                         ran.fetch_add(1);
                         if (i == 13) throw std::runtime_error("item 13 failed");
                       }, 4),
                       "item 13 failed", std::runtime_error);
  CHECK(ran.load() >= 1);
  CHECK(ran.load() <= 100);
  // One thread: the same exception, straight from the loop.
  CHECK_THROWS_WITH_AS(zo2::parallel_for(5, [](std::size_t i) {
                         if (i == 2) throw std::invalid_argument("two");
                       }, 1),
                       "two", std::invalid_argument);
}

TEST_CASE("cut_into_pieces tiles each item in order, pieces start on whole units") {
  const std::vector<std::size_t> sizes = {0, 10, 4000, 999, 5};
  const std::vector<std::size_t> units = {3, 1, 7, 1000, 2};
  const auto pieces = zo2::cut_into_pieces(
      sizes.size(), [&](std::size_t i) { return sizes[i]; }, [&](std::size_t i) { return units[i]; }, 100);
  std::vector<std::size_t> covered(sizes.size(), 0);
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    const auto& p = pieces[k];
    CAPTURE(k);
    CHECK(p.begin == covered[p.item]);  // in order, no gap, no overlap
    CHECK(p.begin % units[p.item] == 0);
    CHECK(p.end > p.begin);
    CHECK(p.end - p.begin <= std::max<std::size_t>(100 / units[p.item], 1) * units[p.item]);
    if (k > 0) CHECK(pieces[k - 1].item <= p.item);
    covered[p.item] = p.end;
  }
  CHECK(covered == sizes);
  CHECK(pieces.size() == 1 + 41 + 1 + 1);  // item 0 none; item 2 in pieces of 98 (14 units of 7)
}

TEST_CASE("parallel_fill sets every byte, small and large") {
  for (const std::size_t n : {std::size_t{0}, std::size_t{5}, (std::size_t{40} << 20) + 3}) {
    std::vector<unsigned char> bytes(n, 1);
    zo2::parallel_fill(bytes, 0x5a);
    std::size_t wrong = 0;
    for (const unsigned char b : bytes) wrong += b != 0x5a;
    CHECK(wrong == 0);
  }
}
