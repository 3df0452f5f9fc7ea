// Regression tests of zo2-opt's own parsers (examples/zo2_opt) for what the fuzz harnesses of
// tests/fuzz found; each input that found one is also in tests/fuzz/corpus/<harness>/ (replayed
// by CTest fuzz_corpus_<harness>). The undefined behaviour among them fails this test where it
// runs under UBSan (the sanitizer stage of tests/run_all.sh).
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include <zo2/io/safetensors.hpp>

#include "checkpoint.hpp"

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
