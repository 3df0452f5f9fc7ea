// zo2/comm/comm_error.hpp -- what a data-parallel transport throws, and the deadline its waits
// share.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include <zo2/core/error.hpp>

namespace zo2 {

/// A transport failed: a call returned an error, or a rank did not answer in time. The message
/// names the transport's call, this rank and, for a timeout, how long it waited.
class CommError : public Error {
 public:
  using Error::Error;
};

/// Seconds, as the transports' options take them; zero or less: wait forever.
using CommSeconds = std::chrono::duration<double>;

namespace comm_detail {

/// Polls `done()` until it returns true or `timeout` has passed (then false). It spins for the
/// first 200 us (a step's reduction usually completes in tens of microseconds), then yields,
/// then sleeps at most 1/64 of the time waited so far (<= 1 ms): waiting long for a slow rank
/// costs little CPU and adds under 2% to the wait.
template <class Done>
bool poll_until(Done&& done, CommSeconds timeout) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (;;) {
    if (done()) return true;
    const auto waited = clock::now() - start;
    if (timeout.count() > 0 && waited >= timeout) return false;
    if (waited < std::chrono::microseconds(200)) continue;
    if (waited < std::chrono::milliseconds(2)) {
      std::this_thread::yield();
      continue;
    }
    const auto nap = std::chrono::duration_cast<std::chrono::microseconds>(waited / 64);
    std::this_thread::sleep_for(std::min<std::chrono::microseconds>(nap, std::chrono::milliseconds(1)));
  }
}

inline std::string seconds_text(CommSeconds s) {
  std::string t = std::to_string(s.count());
  while (t.size() > 1 && t.back() == '0') t.pop_back();
  if (!t.empty() && t.back() == '.') t.pop_back();
  return t + " s";
}

}  // namespace comm_detail

}  // namespace zo2
