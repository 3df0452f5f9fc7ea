// The Hugging Face LLaMA-family fixtures of tests/fixtures/llama (make_llama_fixtures.py): each
// config's expected.safetensors holds the batch transformers saw (left-padded rows, labels), its
// loss, per-row losses and a slice of the logits, with positions 0..seq-1 (HF's forward) and with
// generate()'s position_ids. Shared by the CUDA model test (the CPU test reads them itself).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <zo2/backend/cpu/transformer_kernels.hpp>
#include <zo2/io/safetensors.hpp>
#include <zo2/models/llama/model.hpp>

namespace zo2_test::llama_fixtures {

/// Every fixture directory (the sharded copy of qwen2_bias_bf16 holds the same weights).
inline const std::vector<std::string>& names() {
  static const std::vector<std::string> all = {"llama_gqa",       "llama_mqa_tied_bf16", "llama3_rope_bf16",
                                               "qwen2_bias_bf16", "qwen3_qknorm_fp16",   "mistral_window"};
  return all;
}

/// tests/fixtures/llama/<name>; ZO2_TEST_DATA_DIR overrides the compiled-in path.
inline std::filesystem::path fixture(const std::string& name) {
  const char* env = std::getenv("ZO2_TEST_DATA_DIR");
  return std::filesystem::path(env ? env : ZO2_TEST_DATA_DIR) / "llama" / name;
}

inline std::vector<std::int32_t> read_i64(const zo2::io::SafetensorsFile& file, const std::string& name) {
  const auto& e = file.entry(name);
  REQUIRE(e.dtype == zo2::io::Dtype::I64);
  std::vector<std::int32_t> out(e.numel());
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::int64_t v;
    std::memcpy(&v, e.bytes.data() + 8 * i, 8);
    out[i] = static_cast<std::int32_t>(v);
  }
  return out;
}

inline std::vector<double> read_f64(const zo2::io::SafetensorsFile& file, const std::string& name) {
  const auto& e = file.entry(name);
  REQUIRE(e.dtype == zo2::io::Dtype::F64);
  std::vector<double> out(e.numel());
  std::memcpy(out.data(), e.bytes.data(), 8 * out.size());
  return out;
}

using HostBatch = zo2::llama::LlamaModel<float>::Batch;

/// HF's inputs and outputs for one fixture.
struct Expected {
  HostBatch batch;  // left-padded rows 1 and 2, labels
  double loss = 0;
  std::vector<double> row_losses;
  std::vector<float> logits_slice;  // [batch, seq, slice]: the first `slice` vocabulary columns
  std::size_t slice = 0;
  std::vector<std::int32_t> position_ids;  // generate()'s: cumsum(mask) - 1, pads 1
  std::vector<double> row_losses_positions;
  std::vector<float> logits_slice_positions;
};

inline Expected read_expected(const std::string& name) {
  const auto file = zo2::io::SafetensorsFile::open(fixture(name) / "expected.safetensors");
  Expected x;
  const auto shape = file.entry("input_ids").shape;
  x.batch.batch = static_cast<std::size_t>(shape[0]);
  x.batch.seq = static_cast<std::size_t>(shape[1]);
  x.batch.input_ids = read_i64(file, "input_ids");
  x.batch.attention_mask = read_i64(file, "attention_mask");
  x.batch.labels = read_i64(file, "labels");
  x.loss = file.read_as_float("loss")[0];
  x.row_losses = read_f64(file, "row_losses");
  x.logits_slice = file.read_as_float("logits_slice");
  x.slice = static_cast<std::size_t>(file.entry("logits_slice").shape[2]);
  x.position_ids = read_i64(file, "position_ids");
  x.row_losses_positions = read_f64(file, "row_losses_positions");
  x.logits_slice_positions = file.read_as_float("logits_slice_positions");
  return x;
}

/// Mean cross entropy of each row over its targets, from full logits [batch * seq, vocab]
/// (row-major, float), in double.
inline std::vector<double> row_losses(const float* logits, std::size_t vocab, const HostBatch& batch) {
  std::vector<double> out;
  for (std::size_t b = 0; b < batch.batch; ++b) {
    double total = 0;
    std::size_t count = 0;
    for (std::size_t s = 0; s + 1 < batch.seq; ++s) {
      const std::int32_t target = batch.labels[b * batch.seq + s + 1];
      if (target == zo2::llama::kIgnoreLabel) continue;
      const float* row = logits + (b * batch.seq + s) * vocab;
      total += zo2::cpu::kernels::log_sum_exp(row, static_cast<Eigen::Index>(vocab)) - static_cast<double>(row[target]);
      ++count;
    }
    out.push_back(count ? total / static_cast<double>(count) : std::nan(""));
  }
  return out;
}

/// Max |ours - HF| over the slice of every position (padding included) of full logits
/// [tokens, vocab].
inline double max_slice_error(const float* logits, std::size_t tokens, std::size_t vocab, const std::vector<float>& hf,
                              std::size_t slice) {
  REQUIRE(tokens * slice == hf.size());
  double worst = 0;
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t v = 0; v < slice; ++v) {
      const double d = std::abs(static_cast<double>(logits[t * vocab + v]) - hf[t * slice + v]);
      worst = std::isnan(d) ? INFINITY : std::max(worst, d);
    }
  return worst;
}

/// ||ours - HF|| / ||HF|| over the slice of every position.
inline double rel_slice_error(const float* logits, std::size_t tokens, std::size_t vocab, const std::vector<float>& hf,
                              std::size_t slice) {
  REQUIRE(tokens * slice == hf.size());
  double num = 0, den = 0;
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t v = 0; v < slice; ++v) {
      const double o = logits[t * vocab + v], r = hf[t * slice + v];
      if (!std::isfinite(o)) return INFINITY;
      num += (o - r) * (o - r);
      den += r * r;
    }
  return std::sqrt(num / den);
}

}  // namespace zo2_test::llama_fixtures
