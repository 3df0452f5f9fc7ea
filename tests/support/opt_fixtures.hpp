// The Hugging Face OPT fixtures of tests/fixtures/opt (make_opt_fixtures.py): each config's
// expected.safetensors holds the inputs HF saw and what it computed. Shared by the CPU and the
// CUDA model tests.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <zo2/io/safetensors.hpp>
#include <zo2/models/opt/model.hpp>

namespace zo2_test::opt_fixtures {

/// tests/fixtures/opt/<name>; the environment variable ZO2_TEST_DATA_DIR overrides the
/// compiled-in path (a test binary run from another checkout or machine).
inline std::filesystem::path fixture(const std::string& name) {
  const char* env = std::getenv("ZO2_TEST_DATA_DIR");
  return std::filesystem::path(env ? env : ZO2_TEST_DATA_DIR) / "opt" / name;
}

inline std::vector<std::int32_t> read_i64_as_i32(const zo2::io::SafetensorsFile& file, const std::string& name) {
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

/// HF's inputs and outputs for one fixture.
struct Expected {
  using Batch = zo2::opt::OPTModel<float>::Batch;
  Batch batch;                 // padded batch with labels
  std::vector<float> logits;   // [batch, seq, vocab]
  double loss = 0;
  Batch unpadded;              // row 0, no mask, labels = ids
  std::vector<float> logits_unpadded;
  double loss_unpadded = 0;
  std::vector<std::int32_t> prompt;
  std::vector<std::vector<std::int32_t>> candidates;
  std::vector<double> candidate_scores;
};

inline Expected read_expected(const std::string& name) {
  const auto file = zo2::io::SafetensorsFile::open(fixture(name) / "expected.safetensors");
  Expected x;
  const auto shape = file.entry("input_ids").shape;
  x.batch.batch = static_cast<std::size_t>(shape[0]);
  x.batch.seq = static_cast<std::size_t>(shape[1]);
  x.batch.input_ids = read_i64_as_i32(file, "input_ids");
  x.batch.attention_mask = read_i64_as_i32(file, "attention_mask");
  x.batch.labels = read_i64_as_i32(file, "labels");
  x.logits = file.read_as_float("logits");
  x.loss = file.read_as_float("loss")[0];
  x.unpadded.batch = 1;
  x.unpadded.seq = x.batch.seq;
  x.unpadded.input_ids.assign(x.batch.input_ids.begin(), x.batch.input_ids.begin() + x.batch.seq);
  x.unpadded.labels = x.unpadded.input_ids;
  x.logits_unpadded = file.read_as_float("logits_unpadded");
  x.loss_unpadded = file.read_as_float("loss_unpadded")[0];
  x.prompt = nlohmann::json::parse(file.metadata().at("prompt")).get<std::vector<std::int32_t>>();
  x.candidates =
      nlohmann::json::parse(file.metadata().at("candidates")).get<std::vector<std::vector<std::int32_t>>>();
  x.candidate_scores = read_f64(file, "candidate_scores");
  return x;
}

}  // namespace zo2_test::opt_fixtures
