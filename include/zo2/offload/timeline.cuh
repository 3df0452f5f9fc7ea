// zo2/offload/timeline.cuh -- CUDA-event timeline of the offload engine, per group visit:
// upload start/end (upload stream), compute start/end (compute stream: from the fused kernel
// until the model's forwards of that group are done), offload start/end (offload stream).
//
// Why events and not host clocks: the host enqueues a whole step asynchronously and returns
// long before the GPU runs it; only events on the streams themselves say when a copy and a
// kernel actually overlapped. A fixed pool of timing events is created up front, so recording
// allocates nothing; when the pool is used up, recording stops until restart().
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include <zo2/backend/cuda/memory.cuh>

namespace zo2::gpu {

/// One visit of a group, times in ms from the recording's origin; NaN where the phase did not
/// happen (a resident group has no upload, a visit without an owed update no offload).
struct GroupVisitTimes {
  std::size_t group = 0;
  char kind = 'p';  // 'p': prepare (perturb), 'c': current (eval), 'u': apply_update (flush), 's': settle
                    // (deferred write-back: a lagging host copy brought up to date)
  bool resident = false;
  float upload_start = NAN, upload_end = NAN;
  float compute_start = NAN, compute_end = NAN;
  float pass_end = NAN;  // a perturbing visit: where its pass ended and the model's forwards began
  float offload_start = NAN, offload_end = NAN;
};

class Timeline {
 public:
  /// Event indices of one visit (-1: not recorded).
  struct Marks {
    std::size_t group = 0;
    char kind = 'p';
    bool resident = false;
    int upload_start = -1, upload_end = -1, compute_start = -1, compute_end = -1;
    int pass_end = -1;
    int offload_start = -1, offload_end = -1;
  };

  Timeline() = default;
  /// `capacity` timing events (a visit takes up to 6).
  explicit Timeline(std::size_t capacity) {
    events_.reserve(capacity);
    for (std::size_t i = 0; i < capacity; ++i) events_.emplace_back(true);
  }

  bool enabled() const { return enabled_; }
  /// Drops what was recorded and starts a new recording whose origin is now on `stream`.
  void restart(cudaStream_t stream) {
    visits_.clear();
    next_ = 0;
    enabled_ = !events_.empty();
    origin_ = mark(stream);
  }
  void stop() { enabled_ = false; }

  /// Records the next pool event on `stream`; -1 when not recording or the pool is used up.
  int mark(cudaStream_t stream) {
    if (!enabled_ || next_ >= events_.size()) return -1;
    events_[next_].record(stream);
    return static_cast<int>(next_++);
  }
  /// Appends a visit and returns its index (-1 when not recording).
  int add_visit(const Marks& m) {
    if (!enabled_) return -1;
    visits_.push_back(m);
    return static_cast<int>(visits_.size() - 1);
  }
  Marks* visit(int i) { return i >= 0 && static_cast<std::size_t>(i) < visits_.size() ? &visits_[i] : nullptr; }

  /// Waits for every recorded event and returns the visits in ms from the origin.
  std::vector<GroupVisitTimes> read() const {
    std::vector<GroupVisitTimes> out;
    if (origin_ < 0) return out;
    for (std::size_t i = 0; i < next_; ++i) events_[i].synchronize();
    const auto ms = [&](int e) {
      return e < 0 ? std::numeric_limits<float>::quiet_NaN() : events_[e].elapsed_ms_since(events_[origin_]);
    };
    for (const Marks& m : visits_) {
      GroupVisitTimes t;
      t.group = m.group;
      t.kind = m.kind;
      t.resident = m.resident;
      t.upload_start = ms(m.upload_start);
      t.upload_end = ms(m.upload_end);
      t.compute_start = ms(m.compute_start);
      t.compute_end = ms(m.compute_end);
      t.pass_end = ms(m.pass_end);
      t.offload_start = ms(m.offload_start);
      t.offload_end = ms(m.offload_end);
      out.push_back(t);
    }
    return out;
  }

  /// A fixed-width table of visits (for benches and logs).
  static std::string format(const std::vector<GroupVisitTimes>& visits) {
    std::string s = "group kind     upload[ms]            compute[ms]           offload[ms]\n";
    char line[256];
    const auto iv = [](float a, float b, char* buf) {
      if (std::isnan(a)) std::snprintf(buf, 32, "%21s", "-");
      else std::snprintf(buf, 32, "%9.3f..%-10.3f", a, b);
    };
    for (const auto& v : visits) {
      char u[32], c[32], o[32];
      iv(v.upload_start, v.upload_end, u);
      iv(v.compute_start, v.compute_end, c);
      iv(v.offload_start, v.offload_end, o);
      std::snprintf(line, sizeof line, "%5zu %c%c  %s %s %s\n", v.group, v.kind, v.resident ? 'R' : ' ', u, c, o);
      s += line;
    }
    return s;
  }

 private:
  std::vector<Event> events_;
  std::vector<Marks> visits_;
  std::size_t next_ = 0;
  int origin_ = -1;
  bool enabled_ = false;
};

}  // namespace zo2::gpu
