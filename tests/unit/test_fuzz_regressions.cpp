// Regression tests of the library's parsers for what the fuzz harnesses (tests/fuzz) and their
// review found; zo2-opt's own parsers have theirs in tests/examples/test_fuzz_regressions.cpp.
//
// Deeply nested JSON: nlohmann::json parses any depth without recursion, but copying, comparing
// or dump()ing a value recurses per level, so a 2 MB "[[[[...]]]]" in a safetensors header, an
// index, config.json or vocab.json crashed with a stack overflow where the value is shown in an
// error message (or copied). Every reader now refuses JSON nested deeper than kMaxJsonDepth
// (64) before parsing it, naming the file. (libFuzzer's inputs stay below 4 KB, too shallow to
// overflow; tests/fuzz/corpus holds 100-level versions, which exercise the refusal.)
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include <zo2/io/bpe_tokenizer.hpp>
#include <zo2/io/json_limits.hpp>
#include <zo2/io/safetensors.hpp>
#include <zo2/io/json_file.hpp>
#include <zo2/models/llama/config.hpp>
#include <zo2/models/opt/config.hpp>

namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_fuzz_regressions_unit_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

constexpr std::size_t kDeep = 1'000'000;  // far past any stack: 2 MB of brackets

std::string nested(std::size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

void write(const fs::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; }

std::string safetensors_with_header(const std::string& header) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(static_cast<std::uint64_t>(header.size()) >> (8 * i));
  return out + header;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const zo2::FileError& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("json_nesting_depth counts arrays and objects, not brackets inside strings") {
  using zo2::io::json_nesting_depth;
  CHECK(json_nesting_depth("") == 0);
  CHECK(json_nesting_depth("3") == 0);
  CHECK(json_nesting_depth(R"({"a": [1, {"b": []}], "c": {}})") == 4);
  CHECK(json_nesting_depth(R"({"[[[[": "]]]]{{{{", "q": "\"[[[", "e": "\\"})") == 1);
  CHECK(json_nesting_depth(nested(64)) == 64);
  CHECK(json_nesting_depth(nested(65)) == 65);
  CHECK(json_nesting_depth(nested(kDeep)) == zo2::io::kMaxJsonDepth + 1);  // stops counting
  CHECK(json_nesting_depth("]]]]") == 0);
}

TEST_CASE("safetensors: a header nested 10^6 deep is refused naming the file, not a stack overflow") {
  TempDir dir;
  const fs::path file = dir.path / "deep.safetensors";
  write(file, safetensors_with_header(R"({"t": {"dtype": "F32", "shape": )" + nested(kDeep) + R"(, "data_offsets": [0, 0]}})"));
  const std::string what = error_of([&] { zo2::io::SafetensorsFile::open(file); });
  CHECK(what.find(file.string()) != std::string::npos);
  CHECK(what.find("nested more than 64 levels") != std::string::npos);
  // 64 levels are still read (and then refused as a shape for what they are).
  write(file, safetensors_with_header(R"({"t": {"dtype": "F32", "shape": )" + nested(62) + R"(, "data_offsets": [0, 0]}})"));
  CHECK(error_of([&] { zo2::io::SafetensorsFile::open(file); }).find("shape entry must be a non-negative integer") !=
        std::string::npos);
}

TEST_CASE("sharded index: metadata nested 10^6 deep is refused naming the index") {
  TempDir dir;
  const fs::path index = dir.path / "model.safetensors.index.json";
  write(index, R"({"metadata": {"x": )" + nested(kDeep) + R"(}, "weight_map": {}})");
  const std::string what = error_of([&] { zo2::io::SafetensorsCheckpoint::open(dir.path); });
  CHECK(what.find(index.string()) != std::string::npos);
  CHECK(what.find("nested more than 64 levels") != std::string::npos);
}

TEST_CASE("config.json nested 10^6 deep is refused naming the file") {
  TempDir dir;
  const fs::path config = dir.path / "config.json";
  write(config, R"({"model_type": "opt", "hidden_size": )" + nested(kDeep) + "}");
  const std::string what = error_of([&] { zo2::opt::OPTConfig::from_json_file(config); });
  CHECK(what.find(config.string()) != std::string::npos);
  CHECK(what.find("nested more than 64 levels") != std::string::npos);
}

TEST_CASE("a LLaMA-family config.json nested 10^6 deep is refused naming the file") {
  // LlamaConfig::from_json_file parsed without the check and crashed in the message refusing
  // the field (a library caller's crash; zo2-opt checked the file before).
  TempDir dir;
  const fs::path config = dir.path / "config.json";
  write(config, R"({"model_type": "llama", "hidden_size": )" + nested(kDeep) + "}");
  const std::string what = error_of([&] { zo2::llama::LlamaConfig::from_json_file(config); });
  CHECK(what.find(config.string()) != std::string::npos);
  CHECK(what.find("nested more than 64 levels") != std::string::npos);
}

TEST_CASE("from_json on a caller's parsed JSON names a deep value without recursing into it") {
  // A caller may parse config.json itself: a field 10^6 levels deep is named by its kind.
  nlohmann::json llama = {{"model_type", "llama"}, {"hidden_size", 64}, {"intermediate_size", 128},
                          {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"vocab_size", 32}};
  llama["rope_scaling"] = nlohmann::json::parse(nested(kDeep));  // parsing does not recurse
  try {
    zo2::llama::LlamaConfig::from_json(llama, "parsed");
    FAIL("a nested rope_scaling was accepted");
  } catch (const zo2::ConfigError& e) {
    CHECK(std::string(e.what()).find("rope_scaling") != std::string::npos);
    CHECK(std::string(e.what()).find("an array of 1 element") != std::string::npos);
  }
  nlohmann::json opt = {{"model_type", "opt"}, {"hidden_size", nlohmann::json::array({1, 2})}};
  const std::string what = error_of([&] { zo2::opt::OPTConfig::from_json(opt, "parsed"); });
  CHECK(what.find("hidden_size") != std::string::npos);
  CHECK(what.find("an array of 2 elements") != std::string::npos);
  // Scalars are shown as they are, long strings cut.
  CHECK(zo2::io::json_brief(nlohmann::json(3)) == "3");
  CHECK(zo2::io::json_brief(nlohmann::json("relu")) == "\"relu\"");
  CHECK(zo2::io::json_brief(nlohmann::json(std::string(200, 'x'))) == "\"" + std::string(80, 'x') + "\"...");
  CHECK(zo2::io::json_brief(nlohmann::json::object({{"a", 1}})) == "an object of 1 key");
}

TEST_CASE("vocab.json nested 10^6 deep is refused naming the file") {
  TempDir dir;
  write(dir.path / "vocab.json", R"({"a": )" + nested(kDeep) + "}");
  write(dir.path / "merges.txt", "#version: 0.2\n");
  const std::string what = error_of([&] { zo2::io::BpeTokenizer::from_directory(dir.path); });
  CHECK(what.find((dir.path / "vocab.json").string()) != std::string::npos);
  CHECK(what.find("nested more than 64 levels") != std::string::npos);
}
