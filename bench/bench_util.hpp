// bench/bench_util.hpp -- small helpers every benchmark shares: medians, host RSS, JSON lines.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace zo2_bench {

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// The q-quantile (0..1) by nearest rank.
inline double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t i = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

/// Peak resident set size of this process in bytes (VmHWM), 0 where /proc is unavailable.
inline long long peak_host_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return 0;
}

inline double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

/// Builds one JSON object line: JsonLine().add("k", v).str().
class JsonLine {
 public:
  JsonLine& add(const std::string& key, const std::string& value) {
    sep();
    os_ << '"' << key << "\":\"" << value << '"';
    return *this;
  }
  JsonLine& add(const std::string& key, const char* value) { return add(key, std::string(value)); }
  template <class Number>
  JsonLine& add(const std::string& key, Number value) {
    sep();
    os_ << '"' << key << "\":" << value;
    return *this;
  }
  std::string str() const { return os_.str() + "}"; }
  void print() const { std::printf("%s\n", str().c_str()), std::fflush(stdout); }

 private:
  void sep() { os_ << (first_ ? "{" : ","), first_ = false; }
  std::ostringstream os_;
  bool first_ = true;
};

}  // namespace zo2_bench
