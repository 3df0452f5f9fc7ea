// zo2/comm/replicas.hpp -- are the data-parallel replicas still identical? Every rank applies
// the same update from the same seed, so their parameters must agree bit for bit; a cheap
// periodic check compares a 64-bit hash of each rank's (flushed) parameters across ranks, through
// any Communicator, and stops the run naming the step when they differ.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include <zo2/comm/comm_error.hpp>
#include <zo2/core/communicator.hpp>
#include <zo2/optim/parameter_store.hpp>

namespace zo2 {

/// The replicas' parameters differ: `step()` names when it was seen.
class ReplicaDivergence : public Error {
 public:
  ReplicaDivergence(std::uint64_t step, const std::string& what) : Error(what), step_(step) {}
  std::uint64_t step() const noexcept { return step_; }

 private:
  std::uint64_t step_;
};

namespace replica_detail {

inline std::uint64_t mix(std::uint64_t x) {  // splitmix64's finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

/// Folds `bytes` into `h` 8 bytes at a time (four independent lanes, so the multiplies overlap:
/// several GB/s on one core); the tail is zero-padded and the length is folded in.
inline std::uint64_t hash_bytes(std::uint64_t h, const unsigned char* p, std::size_t bytes) {
  constexpr std::uint64_t k = 0x9e3779b97f4a7c15ull;
  std::uint64_t lane[4] = {h ^ 0x243f6a8885a308d3ull, h ^ 0x13198a2e03707344ull, h ^ 0xa4093822299f31d0ull,
                           h ^ 0x082efa98ec4e6c89ull};
  std::size_t i = 0;
  for (; i + 32 <= bytes; i += 32) {
    for (int l = 0; l < 4; ++l) {
      std::uint64_t w;
      std::memcpy(&w, p + i + 8 * l, 8);
      lane[l] = (lane[l] ^ (w * k)) * 0xff51afd7ed558ccdull;
      lane[l] ^= lane[l] >> 32;
    }
  }
  unsigned char tail[32] = {};
  std::memcpy(tail, p + i, bytes - i);
  for (int l = 0; l < 4; ++l) {
    std::uint64_t w;
    std::memcpy(&w, tail + 8 * l, 8);
    lane[l] = mix(lane[l] ^ (w * k));
  }
  return mix(lane[0] ^ mix(lane[1] + 1) ^ mix(lane[2] + 2) ^ mix(lane[3] + 3) ^ mix(bytes));
}

inline std::string hex(std::uint64_t h) {
  char b[24];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(h));
  return b;
}

}  // namespace replica_detail

/// A 64-bit hash of every parameter's bits, group by group in order.
template <class S>
std::uint64_t parameter_hash(const ParameterStore<S>& store) {
  std::uint64_t h = 0x5a4f32u;  // "ZO2"
  const ModelLayout& ml = store.model_layout();
  for (std::size_t g = 0; g < store.num_groups(); ++g) {
    const auto view = store.group(GroupIndex{g});
    const std::size_t n = ml.layout(GroupIndex{g}).total_elements();
    h = replica_detail::hash_bytes(h + g, reinterpret_cast<const unsigned char*>(view.data()), n * sizeof(S));
  }
  return h;
}

/// Every rank's `hash`, gathered through all_reduce_sum (rank r fills its four 16-bit chunks,
/// exact in doubles; the others are zero): element r is rank r's hash.
inline std::vector<std::uint64_t> gather_hashes(Communicator& comm, std::uint64_t hash) {
  const int n = comm.size();
  std::vector<double> v(4 * static_cast<std::size_t>(n), 0.0);
  for (int c = 0; c < 4; ++c) v[4 * static_cast<std::size_t>(comm.rank()) + c] = static_cast<double>((hash >> (16 * c)) & 0xffff);
  comm.all_reduce_sum(v);
  std::vector<std::uint64_t> out(static_cast<std::size_t>(n), 0);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < 4; ++c) {
      const double x = v[4 * static_cast<std::size_t>(r) + c];
      if (!(x >= 0 && x <= 65535 && x == static_cast<double>(static_cast<std::uint64_t>(x))))
        throw CommError("replica check: rank " + std::to_string(r) + "'s hash arrived corrupted");
      out[static_cast<std::size_t>(r)] |= static_cast<std::uint64_t>(x) << (16 * c);
    }
  return out;
}

/// Compares this rank's parameter hash with every other rank's (a collective: every rank calls
/// it at the same step). Throws ReplicaDivergence naming `step` and the ranks that disagree with
/// rank 0 when they differ.
inline void check_replicas(Communicator& comm, std::uint64_t hash, std::uint64_t step) {
  if (comm.size() <= 1) return;
  const std::vector<std::uint64_t> all = gather_hashes(comm, hash);
  std::string differ;
  std::size_t count = 0;
  for (std::size_t r = 1; r < all.size(); ++r) {
    if (all[r] == all[0]) continue;
    if (++count <= 8) differ += (differ.empty() ? "" : ", ") + std::string("rank ") + std::to_string(r) + " " + replica_detail::hex(all[r]);
  }
  if (count == 0) return;
  if (count > 8) differ += ", and " + std::to_string(count - 8) + " more";
  throw ReplicaDivergence(step, "replicas diverged: after step " + std::to_string(step) + " the parameters of " +
                                    std::to_string(count) + " of " + std::to_string(all.size()) +
                                    " ranks differ from rank 0's (parameter hash: rank 0 " + replica_detail::hex(all[0]) +
                                    "; " + differ + ")");
}

}  // namespace zo2
