// OPTConfig's upper bounds (messages name the field) and load_opt_weights checking every
// tensor against config.json before it allocates the store that config.json's sizes imply.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <zo2/models/opt/opt.hpp>

#include "../support/opt_fixtures.hpp"

namespace {

namespace fs = std::filesystem;
using zo2::opt::OPTConfig;
using zo2_test::opt_fixtures::fixture;

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_opt_limits_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

/// The opt_preln fixture's weights beside its config.json edited by `edit`.
template <class Edit>
fs::path with_config(const TempDir& tmp, const std::string& name, Edit edit) {
  const fs::path dir = tmp.path / name;
  fs::create_directories(dir);
  fs::copy_file(fixture("opt_preln") / "model.safetensors", dir / "model.safetensors");
  std::ifstream in(fixture("opt_preln") / "config.json");
  nlohmann::json j = nlohmann::json::parse(in);
  edit(j);
  std::ofstream(dir / "config.json") << j.dump(2);
  return dir;
}

}  // namespace

TEST_CASE("OPTConfig::validate bounds every size from above, naming the field") {
  const std::int64_t huge = std::int64_t{1} << 32;
  struct Case {
    const char* field;
    std::int64_t OPTConfig::*member;
  };
  for (const Case& c : {Case{"hidden_size", &OPTConfig::hidden_size}, Case{"ffn_dim", &OPTConfig::ffn_dim},
                        Case{"num_hidden_layers", &OPTConfig::num_hidden_layers},
                        Case{"num_attention_heads", &OPTConfig::num_attention_heads},
                        Case{"vocab_size", &OPTConfig::vocab_size},
                        Case{"max_position_embeddings", &OPTConfig::max_position_embeddings},
                        Case{"word_embed_proj_dim", &OPTConfig::word_embed_proj_dim}}) {
    CAPTURE(c.field);
    OPTConfig config = OPTConfig::preset("opt-125m");
    config.*c.member = huge;
    const std::string quoted = std::string("'") + c.field + "'";
    CHECK_THROWS_WITH_AS(config.validate(), doctest::Contains(quoted.c_str()), zo2::ConfigError);
    CHECK_THROWS_WITH_AS(config.validate(), doctest::Contains("at most"), zo2::ConfigError);
  }
  // Every published size is inside the bounds.
  for (const auto& name : OPTConfig::preset_names()) CHECK_NOTHROW(OPTConfig::preset(name).validate());
}

TEST_CASE("A layout is never computed from an out-of-range config (max_position_embeddings + 2 overflowed)") {
  OPTConfig config = OPTConfig::preset("opt-125m");
  config.max_position_embeddings = std::numeric_limits<std::int64_t>::max();
  CHECK_THROWS_WITH_AS(zo2::opt::prologue_layout(config), doctest::Contains("max_position_embeddings"),
                       zo2::ConfigError);
  config = OPTConfig::preset("opt-125m");
  config.hidden_size = std::int64_t{1} << 32;
  config.word_embed_proj_dim = config.hidden_size;
  CHECK_THROWS_WITH_AS(zo2::opt::block_layout(config), doctest::Contains("hidden_size"), zo2::ConfigError);
  CHECK_THROWS_WITH_AS(zo2::opt::parameter_count(config), doctest::Contains("hidden_size"), zo2::ConfigError);
}

TEST_CASE("config.json with a size beyond the bounds is a FileError naming the file and the field") {
  TempDir tmp;
  const fs::path dir = with_config(tmp, "vocab", [](nlohmann::json& j) { j["vocab_size"] = 74836482; });
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(dir), doctest::Contains("config.json"), zo2::FileError);
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(dir), doctest::Contains("vocab_size"), zo2::FileError);
}

TEST_CASE("load_opt_weights checks the tensors against the config before allocating the store") {
  // Within the bounds, but one block of this config is 2^36 floats (256 GiB): were the store
  // allocated first, the load would end in std::bad_alloc (or worse) rather than this message.
  TempDir tmp;
  const fs::path dir = with_config(tmp, "wide", [](nlohmann::json& j) {
    j["hidden_size"] = OPTConfig::kMaxHiddenSize;
    j["word_embed_proj_dim"] = OPTConfig::kMaxHiddenSize;
    j["ffn_dim"] = OPTConfig::kMaxFfnDim;
  });
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(dir),
                       doctest::Contains("tensor 'model.decoder.embed_tokens.weight' has shape [384, 32], config.json "
                                         "implies [384, 65536]"),
                       zo2::FileError);
  // A left-over tensor is also found before any allocation.
  const fs::path deep = with_config(tmp, "deep", [](nlohmann::json& j) {
    j["num_hidden_layers"] = 1;
    j["vocab_size"] = OPTConfig::kMaxVocabSize;
  });
  CHECK_THROWS_AS(zo2::opt::load_opt_checkpoint<float>(deep), zo2::FileError);
}

TEST_CASE("the fixture still loads") {
  const auto loaded = zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  CHECK(loaded.config.hidden_size == 32);
}
