// bench/bench_util.hpp -- small helpers every benchmark shares (host only, no CUDA): medians and
// quantiles, host memory (RSS, its peak and a reset of the peak, MemAvailable), JSON lines.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <type_traits>
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

/// A "Key:   123 kB" field of a /proc file in bytes, 0 where absent.
inline long long proc_kb_field(const char* file, const std::string& key) {
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(key.size())) * 1024;
  return 0;
}

/// Peak resident set size of this process in bytes (VmHWM), 0 where /proc is unavailable.
inline long long peak_host_rss_bytes() { return proc_kb_field("/proc/self/status", "VmHWM:"); }
/// Resident set size now (VmRSS).
inline long long host_rss_bytes() { return proc_kb_field("/proc/self/status", "VmRSS:"); }
/// Resets VmHWM to the current RSS (Linux >= 4.0), so the next peak is one configuration's.
/// Returns false where the kernel does not allow it.
inline bool reset_peak_host_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  return static_cast<bool>(f.flush());
}
/// MemAvailable and MemTotal of the host in bytes (0 when unknown).
inline long long host_available_bytes() { return proc_kb_field("/proc/meminfo", "MemAvailable:"); }
inline long long host_total_bytes() { return proc_kb_field("/proc/meminfo", "MemTotal:"); }

inline std::vector<std::string> split(const std::string& s, char sep = ',') {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

/// s as a JSON string literal (quotes included).
inline std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (c == '\n') out += "\\n";
    else if (static_cast<unsigned char>(c) < 0x20) out += ' ';
    else out += c;
  }
  return out + "\"";
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
    os_ << '"' << key << "\":" << json_quote(value);
    return *this;
  }
  JsonLine& add(const std::string& key, const char* value) { return add(key, std::string(value)); }
  JsonLine& add(const std::string& key, bool value) { return raw(key, value ? "true" : "false"); }
  /// Numbers; NaN and infinities become null (JSON has neither).
  template <class Number>
  JsonLine& add(const std::string& key, Number value) {
    if constexpr (std::is_floating_point_v<Number>)
      if (!std::isfinite(value)) return raw(key, "null");
    sep();
    os_ << '"' << key << "\":" << value;
    return *this;
  }
  /// A value already in JSON (null, an array, an object).
  JsonLine& raw(const std::string& key, const std::string& json) {
    sep();
    os_ << '"' << key << "\":" << json;
    return *this;
  }
  std::string str() const { return first_ ? "{}" : os_.str() + "}"; }
  void print() const { std::printf("%s\n", str().c_str()), std::fflush(stdout); }

 private:
  void sep() { os_ << (first_ ? "{" : ","), first_ = false; }
  std::ostringstream os_;
  bool first_ = true;
};

}  // namespace zo2_bench
