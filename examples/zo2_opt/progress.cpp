#include "progress.hpp"

#include <algorithm>
#include <cmath>

#include <unistd.h>

namespace zo2_opt {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  const long total = static_cast<long>(std::lround(s));
  if (total >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", total / 3600, (total / 60) % 60);
  else if (total >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", total / 60, total % 60);
  else std::snprintf(buf, sizeof buf, "%.1fs", s);
  return buf;
}

std::string format_bytes(std::size_t bytes) {
  char buf[32];
  const double gib = static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0);
  if (gib >= 1) std::snprintf(buf, sizeof buf, "%.2f GiB", gib);
  else std::snprintf(buf, sizeof buf, "%.0f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

Progress::Progress(std::uint64_t first_step, std::uint64_t total_steps, bool quiet)
    : first_(first_step), total_(total_steps), quiet_(quiet), tty_(::isatty(STDERR_FILENO) != 0),
      every_(std::max<std::uint64_t>(1, (total_steps - std::min(first_step, total_steps)) / 20)),
      start_(std::chrono::steady_clock::now()), last_print_(start_) {}

double Progress::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::update(std::uint64_t step, double loss, double tokens_per_s, std::optional<std::size_t> device_bytes) {
  if (quiet_) return;
  const auto now = std::chrono::steady_clock::now();
  const std::uint64_t done = step + 1 - first_;
  const bool last = step + 1 >= total_;
  const double since_print = std::chrono::duration<double>(now - last_print_).count();
  if (tty_) {
    if (since_print < 0.1 && !last) return;
  } else if (!last && done % every_ != 0 && since_print < 10.0) {
    return;
  }
  last_print_ = now;
  const double elapsed = elapsed_s();
  const double eta = elapsed / static_cast<double>(done) * static_cast<double>(total_ - step - 1);
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %llu/%llu  loss %.4f  %.0f tok/s  elapsed %s  eta %s",
                static_cast<unsigned long long>(step + 1), static_cast<unsigned long long>(total_), loss, tokens_per_s,
                format_duration(elapsed).c_str(), format_duration(eta).c_str());
  std::string line = buf;
  if (device_bytes) line += "  gpu mem " + format_bytes(*device_bytes);
  if (tty_) {
    std::fprintf(stderr, "\r\033[K%s", line.c_str());
    dirty_ = true;
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

void Progress::note(const std::string& line) {
  if (dirty_) std::fprintf(stderr, "\r\033[K");
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  dirty_ = false;
}

void Progress::finish() {
  if (dirty_) std::fprintf(stderr, "\n");
  dirty_ = false;
  std::fflush(stderr);
}

}  // namespace zo2_opt
