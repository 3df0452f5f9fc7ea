// OPTConfig: presets with the published parameter counts, config.json parsing with errors that
// name the file and field, validation, and a to_json round trip.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/layout.hpp>

namespace {

namespace fs = std::filesystem;
using zo2::opt::OPTConfig;

fs::path fixture_config() { return fs::path(ZO2_TEST_DATA_DIR) / "opt" / "opt_preln" / "config.json"; }

/// A scratch directory for this test binary, removed at exit.
struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_opt_config_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

/// Writes the fixture's config.json with one edit and returns the file's path.
template <class Edit>
fs::path edited_config(const TempDir& dir, const std::string& file_name, Edit edit) {
  std::ifstream in(fixture_config());
  nlohmann::json j = nlohmann::json::parse(in);
  edit(j);
  const fs::path path = dir.path / file_name;
  std::ofstream(path) << j.dump(2);
  return path;
}

}  // namespace

TEST_CASE("OPT presets have the published sizes and parameter counts") {
  // transformers' OPTForCausalLM.num_parameters() (tied LM head counted once).
  CHECK(zo2::opt::parameter_count(OPTConfig::preset("opt-125m")) == 125'239'296u);
  CHECK(zo2::opt::parameter_count(OPTConfig::preset("opt-350m")) == 331'196'416u);
  CHECK(zo2::opt::parameter_count(OPTConfig::preset("opt-1.3b")) == 1'315'758'080u);
  CHECK(zo2::opt::parameter_count(OPTConfig::preset("opt-2.7b")) == 2'651'596'800u);
  CHECK(zo2::opt::parameter_count(OPTConfig::preset("opt-6.7b")) == 6'658'473'984u);
  CHECK(zo2::opt::parameter_count(OPTConfig::preset("opt-13b")) == 12'853'473'280u);
  const double b30 = static_cast<double>(zo2::opt::parameter_count(OPTConfig::preset("opt-30b")));
  CHECK(b30 == doctest::Approx(29.97e9).epsilon(0.005));
  const double b66 = static_cast<double>(zo2::opt::parameter_count(OPTConfig::preset("opt-66b")));
  CHECK(b66 == doctest::Approx(65.7e9).epsilon(0.005));
  const double b175 = static_cast<double>(zo2::opt::parameter_count(OPTConfig::preset("facebook/opt-175b")));
  CHECK(b175 == doctest::Approx(174.6e9).epsilon(0.005));

  const OPTConfig m350 = OPTConfig::preset("opt-350m");
  CHECK_FALSE(m350.do_layer_norm_before);
  CHECK(m350.word_embed_proj_dim == 512);
  CHECK(m350.has_projection());
  CHECK_FALSE(m350.has_final_layer_norm());
  for (const auto& name : OPTConfig::preset_names()) CHECK_NOTHROW(OPTConfig::preset(name).validate());
}

TEST_CASE("An unknown preset lists the valid names") {
  CHECK_THROWS_WITH_AS(OPTConfig::preset("opt-7b"), doctest::Contains("opt-125m, opt-350m, opt-1.3b"),
                       zo2::ConfigError);
}

TEST_CASE("OPT layouts: names, shapes and weight-decay flags follow HF") {
  OPTConfig c = OPTConfig::preset("opt-350m");
  const auto pro = zo2::opt::prologue_layout(c);
  CHECK(pro.spec(pro.index_of("embed_tokens.weight")).shape == std::vector<std::int64_t>{50272, 512});
  CHECK(pro.spec(pro.index_of("embed_positions.weight")).shape == std::vector<std::int64_t>{2050, 1024});
  CHECK(pro.spec(pro.index_of("project_in.weight")).shape == std::vector<std::int64_t>{1024, 512});
  const auto blk = zo2::opt::block_layout(c);
  CHECK(blk.num_tensors() == 16);
  CHECK(blk.spec(blk.index_of("fc1.weight")).shape == std::vector<std::int64_t>{4096, 1024});
  CHECK(blk.spec(blk.index_of("fc1.weight")).weight_decay);
  CHECK_FALSE(blk.spec(blk.index_of("fc1.bias")).weight_decay);
  CHECK_FALSE(blk.spec(blk.index_of("self_attn_layer_norm.weight")).weight_decay);
  const auto epi = zo2::opt::epilogue_layout(c);
  CHECK(epi.num_tensors() == 1);
  CHECK(epi.spec(0).name == "project_out.weight");

  c.enable_bias = false;
  c.layer_norm_elementwise_affine = false;
  CHECK(zo2::opt::block_layout(c).num_tensors() == 6);
  CHECK(zo2::opt::hf_block_name(3, "fc2.bias") == "model.decoder.layers.3.fc2.bias");
}

TEST_CASE("OPTConfig::from_json_file reads HF's config.json") {
  const OPTConfig c = OPTConfig::from_json_file(fixture_config());
  CHECK(c.hidden_size == 32);
  CHECK(c.ffn_dim == 64);
  CHECK(c.num_hidden_layers == 2);
  CHECK(c.num_attention_heads == 4);
  CHECK(c.vocab_size == 384);
  CHECK(c.max_position_embeddings == 48);
  CHECK(c.word_embed_proj_dim == 32);
  CHECK(c.do_layer_norm_before);
  CHECK(c.enable_bias);
  CHECK(c.pad_token_id == 1);
  CHECK(c.activation_function == "relu");
  // to_json writes what from_json reads.
  CHECK(OPTConfig::from_json(c.to_json(), "roundtrip") == c);
  const OPTConfig p = OPTConfig::preset("opt-350m");
  CHECK(OPTConfig::from_json(p.to_json("bfloat16"), "roundtrip") == p);
}

TEST_CASE("OPTConfig defaults optional fields as transformers does") {
  TempDir dir;
  const auto path = edited_config(dir, "minimal.json", [](nlohmann::json& j) {
    for (const char* f : {"word_embed_proj_dim", "do_layer_norm_before", "enable_bias", "activation_function",
                          "layer_norm_elementwise_affine", "_remove_final_layer_norm", "pad_token_id"})
      j.erase(f);
  });
  const OPTConfig c = OPTConfig::from_json_file(path);
  CHECK(c.word_embed_proj_dim == c.hidden_size);
  CHECK(c.do_layer_norm_before);
  CHECK(c.enable_bias);
  CHECK(c.layer_norm_elementwise_affine);
  CHECK(c.pad_token_id == 1);
  const auto null_proj = edited_config(dir, "null_proj.json", [](nlohmann::json& j) { j["word_embed_proj_dim"] = nullptr; });
  CHECK(OPTConfig::from_json_file(null_proj).word_embed_proj_dim == 32);
}

TEST_CASE("Bad config.json fields throw FileError naming the file and the field") {
  TempDir dir;
  struct Case {
    const char* file;
    void (*edit)(nlohmann::json&);
    const char* field;
  };
  const Case cases[] = {
      {"missing_hidden.json", [](nlohmann::json& j) { j.erase("hidden_size"); }, "'hidden_size' is missing"},
      {"string_ffn.json", [](nlohmann::json& j) { j["ffn_dim"] = "64"; }, "'ffn_dim' must be an integer"},
      {"float_vocab.json", [](nlohmann::json& j) { j["vocab_size"] = 384.5; }, "'vocab_size' must be an integer"},
      {"bad_bool.json", [](nlohmann::json& j) { j["do_layer_norm_before"] = 1; }, "'do_layer_norm_before' must be true or false"},
      {"bad_act.json", [](nlohmann::json& j) { j["activation_function"] = 3; }, "'activation_function' must be a string"},
      {"unknown_act.json", [](nlohmann::json& j) { j["activation_function"] = "swish"; }, "activation_function"},
      {"heads.json", [](nlohmann::json& j) { j["num_attention_heads"] = 5; }, "num_attention_heads"},
      {"negative.json", [](nlohmann::json& j) { j["num_hidden_layers"] = -1; }, "num_hidden_layers"},
      {"model_type.json", [](nlohmann::json& j) { j["model_type"] = "gpt2"; }, "'model_type' must be \"opt\""},
      {"untied.json", [](nlohmann::json& j) { j["tie_word_embeddings"] = false; }, "tie_word_embeddings"},
      {"pad.json", [](nlohmann::json& j) { j["pad_token_id"] = 999; }, "pad_token_id"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.file);
    const fs::path path = edited_config(dir, c.file, c.edit);
    CHECK_THROWS_WITH_AS(OPTConfig::from_json_file(path), doctest::Contains(c.field), zo2::FileError);
    CHECK_THROWS_WITH_AS(OPTConfig::from_json_file(path), doctest::Contains(c.file), zo2::FileError);
  }
  CHECK_THROWS_WITH_AS(OPTConfig::from_json_file(dir.path / "absent.json"), doctest::Contains("absent.json"),
                       zo2::FileError);
  std::ofstream(dir.path / "broken.json") << "{\"hidden_size\": ";
  CHECK_THROWS_WITH_AS(OPTConfig::from_json_file(dir.path / "broken.json"), doctest::Contains("not valid JSON"),
                       zo2::FileError);
}

TEST_CASE("OPTConfig::validate names the field") {
  OPTConfig c = OPTConfig::preset("opt-125m");
  c.num_attention_heads = 7;
  try {
    c.validate();
    FAIL("expected a ConfigError");
  } catch (const zo2::ConfigError& e) {
    CHECK(e.field() == "num_attention_heads");
  }
  c = OPTConfig::preset("opt-125m");
  c.word_embed_proj_dim = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("word_embed_proj_dim"), zo2::ConfigError);
  c = OPTConfig::preset("opt-125m");
  c.activation_function = "gelu";
  CHECK_NOTHROW(c.validate());
}
