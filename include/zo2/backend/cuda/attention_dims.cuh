// zo2/backend/cuda/attention_dims.cuh -- the shape of a grouped-query causal attention call,
// shared by the materialized path (attention.cuh) and the fused kernels (flash_attention.cuh).
#pragma once

#include <cstdint>
#include <string>

#include <zo2/core/error.hpp>

namespace zo2::gpu {

/// The shape of a grouped-query causal attention: `batch` sequences of `seq` tokens; query rows
/// [batch * seq, >= heads * head_dim] at row stride ld_q, key and value rows at ld_kv (kv_heads
/// heads), output rows at ld_out; head h in columns [h D, (h + 1) D) of its matrix. Strides of 0
/// mean dense rows (heads D, kv_heads D, heads D). window > 0: query i sees keys j with
/// i - j < window (a window >= seq sees as much as none).
struct AttentionDims {
  std::int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::int64_t ld_q = 0, ld_kv = 0, ld_out = 0;
  std::int64_t window = 0;

  /// Multi-head attention on dense [tokens, heads * head_dim] rows (OPT's).
  static AttentionDims mha(std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t head_dim) {
    AttentionDims d;
    d.batch = batch, d.seq = seq, d.heads = heads, d.kv_heads = heads, d.head_dim = head_dim;
    return d.resolved();
  }
  std::int64_t group() const { return heads / kv_heads; }
  /// Zero strides replaced by dense ones; a window that never binds (>= seq) by 0.
  AttentionDims resolved() const {
    AttentionDims d = *this;
    if (d.ld_q == 0) d.ld_q = heads * head_dim;
    if (d.ld_kv == 0) d.ld_kv = kv_heads * head_dim;
    if (d.ld_out == 0) d.ld_out = heads * head_dim;
    if (d.window >= d.seq) d.window = 0;
    return d;
  }
  /// OPT's case: one kv head per query head, no window, dense rows of one width.
  bool plain() const {
    return kv_heads == heads && window == 0 && ld_q == heads * head_dim && ld_kv == ld_q && ld_out == ld_q;
  }
  /// Throws ShapeError naming the bad size (call on resolved()).
  void validate(const char* who) const {
    auto fail = [&](const std::string& why) { throw ShapeError(std::string(who) + ": " + why); };
    if (batch <= 0 || seq <= 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0)
      fail("batch, seq, heads, kv_heads and head_dim must be > 0");
    if (heads % kv_heads != 0)
      fail("heads " + std::to_string(heads) + " is not a multiple of kv_heads " + std::to_string(kv_heads));
    if (ld_q < heads * head_dim || ld_out < heads * head_dim || ld_kv < kv_heads * head_dim)
      fail("a row stride is smaller than its heads");
    if (window < 0) fail("the window must be >= 0");
    if (seq > 0x7fffffff || ld_q > 0x7fffffff || ld_kv > 0x7fffffff || ld_out > 0x7fffffff)
      fail("seq or a row stride does not fit in 32 bits");
  }
};

}  // namespace zo2::gpu
