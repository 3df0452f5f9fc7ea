// zo2-opt: the progress line. On a terminal it is redrawn in place with \r; otherwise (a log
// file, CI) a plain line is printed every `every` steps or every 10 seconds.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

namespace zo2_opt {

std::string format_duration(double seconds);
std::string format_bytes(std::size_t bytes);

class Progress {
 public:
  Progress(std::uint64_t first_step, std::uint64_t total_steps, bool quiet);
  /// After step `step` (0-based) has run.
  void update(std::uint64_t step, double loss, double tokens_per_s, std::optional<std::size_t> device_bytes);
  /// Prints a message on its own line without garbling the progress line.
  void note(const std::string& line);
  /// Ends the in-place line.
  void finish();
  double elapsed_s() const;

 private:
  std::uint64_t first_, total_;
  bool quiet_, tty_;
  bool dirty_ = false;
  std::uint64_t every_;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace zo2_opt
