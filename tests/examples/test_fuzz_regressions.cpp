// Regression tests of zo2-opt's own parsers (examples/zo2_opt) for what the fuzz harnesses of
// tests/fuzz found; each input that found one is also in tests/fuzz/corpus/<harness>/ (replayed
// by CTest fuzz_corpus_<harness>). The undefined behaviour among them fails this test where it
// runs under UBSan (the sanitizer stage of tests/run_all.sh).
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include <zo2/io/safetensors.hpp>

#include "checkpoint.hpp"
#include "data.hpp"

namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_fuzz_regressions_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

}  // namespace

TEST_CASE("read_rule_state: a group of zero elements reads as an empty group (no memcpy into a null pointer)") {
  // fuzz_encoded_state: crash-rule-state-empty-group (UBSan: null pointer passed to memcpy).
  TempDir dir;
  const float values[4] = {0.5f, -0.25f, 1e-8f, 0.0f};
  zo2::io::write_safetensors(dir.path / zo2_opt::kRuleStateFile,
                             {{"group.0", zo2::io::Dtype::F32, {4}, values}, {"group.1", zo2::io::Dtype::F32, {0}, nullptr}},
                             {{"slots", "2"}, {"groups", "2"}});
  const auto state = zo2_opt::read_rule_state(dir.path);
  REQUIRE(state.has_value());
  CHECK(state->slots == 2);
  REQUIRE(state->groups.size() == 2);
  CHECK(state->groups[0] == std::vector<float>(values, values + 4));
  CHECK(state->groups[1].empty());
}

TEST_CASE("state.json and JSONL data nested 10^6 deep are refused naming the file (and line)") {
  // A resume copies sections of state.json, and errors show a bad value: both recurse per level
  // of nesting (see include/zo2/io/json_limits.hpp).
  TempDir dir;
  const std::string deep = std::string(1'000'000, '[') + std::string(1'000'000, ']');
  std::ofstream(dir.path / zo2_opt::kStateFile) << R"({"step": 1, "seed": 2, "train": {"x": )" + deep + "}}";
  try {
    zo2_opt::read_state(dir.path);
    FAIL("a state.json nested 10^6 deep was read");
  } catch (const zo2::FileError& e) {
    CHECK(std::string(e.what()).find("state.json: JSON nested more than 64 levels deep") != std::string::npos);
  }
  const fs::path data = dir.path / "data.jsonl";
  std::ofstream(data) << "{\"input_ids\": [2, 3]}\n{\"input_ids\": " + deep + "}\n";
  zo2_opt::DataOptions options;
  options.vocab_size = 260;
  try {
    zo2_opt::load_dataset(data, false, nullptr, options);
    FAIL("a JSONL line nested 10^6 deep was read");
  } catch (const zo2::Error& e) {
    CHECK(std::string(e.what()).find("data.jsonl:2: JSON nested more than 64 levels deep") != std::string::npos);
  }
}
