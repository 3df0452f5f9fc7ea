// Loading Hugging Face OPT checkpoints into a ParameterStore (single file, sharded, prefixes,
// tied LM head) with errors naming the file and tensor; and save_hf_checkpoint round trips.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/models/opt/opt.hpp>

#include "../support/opt_fixtures.hpp"

namespace {

namespace fs = std::filesystem;
using zo2::opt::OPTConfig;

using zo2_test::opt_fixtures::fixture;

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_opt_loader_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
  fs::path sub(const std::string& name) const {
    fs::create_directories(path / name);
    return path / name;
  }
};

/// Copies a fixture checkpoint into `dir`, passing each tensor name through `rename`
/// (nullopt drops the tensor) and letting `extra` add tensors; config.json through `edit_config`.
void rewrite_checkpoint(const std::string& source, const fs::path& dir,
                        const std::function<std::optional<std::string>(const std::string&)>& rename,
                        const std::function<void(nlohmann::json&)>& edit_config = {},
                        std::vector<zo2::io::TensorToWrite> extra = {}) {
  const auto file = zo2::io::SafetensorsFile::open(fixture(source) / "model.safetensors");
  std::vector<zo2::io::TensorToWrite> tensors;
  for (const auto& e : file.entries())
    if (auto name = rename(e.name)) tensors.push_back({*name, e.dtype, e.shape, e.bytes.data()});
  for (auto& t : extra) tensors.push_back(t);
  zo2::io::write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  std::ifstream in(fixture(source) / "config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  if (edit_config) edit_config(config);
  std::ofstream(dir / "config.json") << config.dump(2);
}

std::optional<std::string> keep(const std::string& name) { return name; }

}  // namespace

TEST_CASE("A sharded checkpoint loads to the same store as the single file") {
  const auto single = zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  const auto sharded = zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln_sharded"));
  CHECK(single.config == sharded.config);
  CHECK(single.store == sharded.store);
}

TEST_CASE("Checkpoint tensor names are accepted with or without the model. / decoder. prefix") {
  TempDir tmp;
  const auto reference = zo2::opt::load_opt_checkpoint<float>(fixture("opt_postln_proj"));
  const std::string prefix = "model.decoder.";
  const fs::path decoder_only = tmp.sub("decoder_only"), bare = tmp.sub("bare");
  rewrite_checkpoint("opt_postln_proj", decoder_only,
                     [&](const std::string& n) -> std::optional<std::string> { return "decoder." + n.substr(prefix.size()); });
  rewrite_checkpoint("opt_postln_proj", bare,
                     [&](const std::string& n) -> std::optional<std::string> { return n.substr(prefix.size()); });
  CHECK(zo2::opt::load_opt_checkpoint<float>(decoder_only).store == reference.store);
  CHECK(zo2::opt::load_opt_checkpoint<float>(bare).store == reference.store);
}

TEST_CASE("A present lm_head.weight must equal the token embedding") {
  TempDir tmp;
  const auto file = zo2::io::SafetensorsFile::open(fixture("opt_preln") / "model.safetensors");
  const auto& embed = file.entry("model.decoder.embed_tokens.weight");
  const fs::path tied = tmp.sub("tied"), untied = tmp.sub("untied");
  rewrite_checkpoint("opt_preln", tied, keep, {}, {{"lm_head.weight", embed.dtype, embed.shape, embed.bytes.data()}});
  CHECK(zo2::opt::load_opt_checkpoint<float>(tied).store ==
        zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln")).store);

  std::vector<float> other = file.read_as_float("model.decoder.embed_tokens.weight");
  other[17] += 1.0f;
  rewrite_checkpoint("opt_preln", untied, keep, {}, {{"lm_head.weight", zo2::io::Dtype::F32, embed.shape, other.data()}});
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(untied), doctest::Contains("'lm_head.weight'"),
                       zo2::FileError);
}

TEST_CASE("A missing tensor, a wrong shape or a left-over tensor names the file and the tensor") {
  TempDir tmp;
  const fs::path missing = tmp.sub("missing");
  rewrite_checkpoint("opt_preln", missing, [](const std::string& n) -> std::optional<std::string> {
    if (n == "model.decoder.layers.1.fc2.bias") return std::nullopt;
    return n;
  });
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(missing),
                       doctest::Contains("missing tensor 'model.decoder.layers.1.fc2.bias'"), zo2::FileError);
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(missing), doctest::Contains("missing/model.safetensors"),
                       zo2::FileError);

  const fs::path shape = tmp.sub("shape");
  rewrite_checkpoint("opt_preln", shape, keep, [](nlohmann::json& c) { c["ffn_dim"] = 48; });
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(shape),
                       doctest::Contains("tensor 'model.decoder.layers.0.fc1.weight' has shape [64, 32], config.json "
                                         "implies [48, 32]"),
                       zo2::FileError);

  const fs::path extra_layer = tmp.sub("extra_layer");
  rewrite_checkpoint("opt_preln", extra_layer, keep, [](nlohmann::json& c) { c["num_hidden_layers"] = 1; });
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(extra_layer),
                       doctest::Contains("unexpected tensor 'model.decoder.layers.1."), zo2::FileError);

  // A post-LN config over pre-LN weights: final_layer_norm is left over.
  const fs::path post = tmp.sub("post");
  rewrite_checkpoint("opt_preln", post, keep, [](nlohmann::json& c) { c["do_layer_norm_before"] = false; });
  CHECK_THROWS_WITH_AS(zo2::opt::load_opt_checkpoint<float>(post),
                       doctest::Contains("model.decoder.final_layer_norm."), zo2::FileError);

  // A sharded checkpoint names the shard that holds the bad tensor.
  CHECK_THROWS_WITH_AS(
      [] {
        OPTConfig c = OPTConfig::from_json_file(fixture("opt_preln_sharded") / "config.json");
        c.ffn_dim = 48;
        zo2::opt::load_opt_weights<float>(fixture("opt_preln_sharded"), c);
      }(),
      doctest::Contains("model-0000"), zo2::FileError);
}

TEST_CASE("save_hf_checkpoint round trips in F32 and BF16") {
  TempDir tmp;
  for (const char* name : {"opt_preln", "opt_postln_proj", "opt_nobias_bf16"}) {
    CAPTURE(name);
    const auto original = zo2::opt::load_opt_checkpoint<float>(fixture(name));

    const fs::path f32 = tmp.path / (std::string(name) + "_f32");
    zo2::opt::save_hf_checkpoint(f32, original.config, original.store);
    const auto back = zo2::opt::load_opt_checkpoint<float>(f32);
    CHECK(back.config == original.config);
    CHECK(back.store == original.store);
    const auto file = zo2::io::SafetensorsFile::open(f32 / "model.safetensors");
    CHECK(file.metadata().at("format") == "pt");
    CHECK(file.contains("model.decoder.embed_tokens.weight"));
    CHECK_FALSE(file.contains("lm_head.weight"));
    CHECK(file.entry("model.decoder.embed_tokens.weight").dtype == zo2::io::Dtype::F32);

    // BF16 on disk = the store rounded to nearest bf16, element by element.
    const fs::path bf16 = tmp.path / (std::string(name) + "_bf16");
    zo2::opt::save_hf_checkpoint(bf16, original.config, original.store, zo2::io::Dtype::BF16);
    const auto back16 = zo2::opt::load_opt_checkpoint<zo2::bfloat16>(bf16);
    const auto& ml = original.store.model_layout();
    std::size_t mismatches = 0;
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      const auto a = original.store.group(zo2::GroupIndex{g});
      const auto b = back16.store.group(zo2::GroupIndex{g});
      for (std::size_t r = 0; r < a.layout().num_tensors(); ++r)
        for (std::size_t j = 0; j < a.numel(r); ++j)
          mismatches += zo2::to_bfloat16(a.tensor(r)[j]).bits != b.tensor(r)[j].bits;
    }
    CHECK(mismatches == 0);
    std::ifstream in(bf16 / "config.json");
    CHECK(nlohmann::json::parse(in).at("dtype") == "bfloat16");
  }
  // The bf16 fixture is bf16-exact, so saving it as BF16 reproduces it bit for bit.
  const auto bf16_fixture = zo2::opt::load_opt_checkpoint<zo2::bfloat16>(fixture("opt_nobias_bf16"));
  CHECK(zo2::opt::load_opt_checkpoint<zo2::bfloat16>(tmp.path / "opt_nobias_bf16_bf16").store == bf16_fixture.store);
}

TEST_CASE("save_hf_checkpoint replaces a stale index and rejects a bad dtype or a foreign store") {
  TempDir tmp;
  const auto original = zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  const fs::path dir = tmp.sub("stale");
  fs::copy(fixture("opt_preln_sharded"), dir, fs::copy_options::overwrite_existing);
  zo2::opt::save_hf_checkpoint(dir, original.config, original.store);
  CHECK_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  CHECK(zo2::opt::load_opt_checkpoint<float>(dir).store == original.store);
  for (const auto& entry : fs::directory_iterator(dir))  // no temporary file left behind
    CHECK(entry.path().filename().string().find(".tmp.") == std::string::npos);

  CHECK_THROWS_AS(zo2::opt::save_hf_checkpoint(tmp.path / "i32", original.config, original.store, zo2::io::Dtype::I32),
                  zo2::ConfigError);
  OPTConfig other = original.config;
  other.ffn_dim = 48;
  CHECK_THROWS_AS(zo2::opt::save_hf_checkpoint(tmp.path / "other", other, original.store), zo2::ConfigError);
}
