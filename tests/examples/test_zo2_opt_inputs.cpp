// zo2-opt's input checks, on the example's own sources: command-line values outside a flag's
// range, model overrides beyond OPTConfig's bounds or the machine's memory, and state.json
// fields of the wrong type or range all end in one-line errors naming the flag, file and field.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>
#include <zo2/core/philox.hpp>

#include "checkpoint.hpp"
#include "cli.hpp"
#include "engine.hpp"
#include "model_setup.hpp"

namespace {

namespace fs = std::filesystem;
using zo2_opt::Args;
using zo2_opt::CommandSpec;
using zo2_opt::UsageError;

CommandSpec spec() {
  return {"train", "", "", {{"--batch", "N", "", ""}, {"--gpu-memory-budget", "GIB", "", ""}, {"--lr", "X", "", ""}}, ""};
}

Args parse(std::vector<std::string> argv) { return Args(spec(), argv); }

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_zo2_opt_inputs_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

/// A state.json as zo2-opt train writes it.
nlohmann::json good_state() {
  return nlohmann::json::parse(R"({
    "format": "zo2-opt-checkpoint/1", "noise_scheme": 2, "step": 15, "seed": 18446744073709551615,
    "skipped_steps": 3, "tokenizer": "bytes",
    "optimizer": {"algorithm": "mezo-sgd", "lr": 0.001, "eps": 0.001, "weight_decay": 0,
                  "lr_schedule": "constant", "warmup_steps": 0},
    "train": {"total_steps": 30, "batch": 4, "seq_len": 32, "demo": true, "data_kind": "demo", "data": null,
              "template": "{prompt}", "candidates": null, "eval_data": null, "eval_every": 0, "eval_limit": 256,
              "checkpoint_every": 5, "checkpoint_dir": "/tmp/ck",
              "engine": {"device": "cpu", "offload": false, "codec": null, "gpu_memory_budget_gib": null,
                         "description": "cpu"}},
    "model": {}
  })");
}

/// Writes `text` as <dir>/<name>/state.json and returns read_state()'s result.
nlohmann::json read_text(const TempDir& tmp, const std::string& name, const std::string& text) {
  const fs::path dir = tmp.path / name;
  fs::create_directories(dir);
  std::ofstream(dir / "state.json") << text;
  return zo2_opt::read_state(dir);
}

}  // namespace

TEST_CASE("--gpu-memory-budget: negative, non-finite or absurd values are usage errors naming the flag") {
  for (const char* bad : {"-1", "-0.5", "nan", "inf", "1e30", "70000"}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(parse({"--gpu-memory-budget", bad}).number("--gpu-memory-budget", 0),
                         doctest::Contains("--gpu-memory-budget"), UsageError);
  }
  CHECK(parse({"--gpu-memory-budget", "0.5"}).number("--gpu-memory-budget", 0) == 0.5);
  CHECK(parse({"--gpu-memory-budget", "0"}).number("--gpu-memory-budget", 1) == 0);
  // Flags without a range keep their full range.
  CHECK(parse({"--lr", "-1e30"}).number("--lr", 0) == -1e30);
}

TEST_CASE("--batch is bounded: 1 .. kMaxBatch, through every integer reader") {
  for (const char* bad : {"0", "65537", "100000000000"}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(parse({"--batch", bad}).unsigned_integer("--batch", 1), doctest::Contains("--batch"),
                         UsageError);
    CHECK_THROWS_WITH_AS(parse({"--batch", bad}).integer("--batch", 1), doctest::Contains("--batch"), UsageError);
  }
  CHECK_THROWS_WITH_AS(parse({"--batch", "-3"}).integer("--batch", 1), doctest::Contains("--batch"), UsageError);
  CHECK(parse({"--batch", "16"}).unsigned_integer("--batch", 1) == 16);
  CHECK(parse({"--batch", "65536"}).integer("--batch", 1) == 65536);
  CHECK(parse({}).unsigned_integer("--batch", 8) == 8);
}

TEST_CASE("model overrides beyond OPTConfig's bounds name the flag (no std::bad_alloc)") {
  CHECK_THROWS_WITH_AS(zo2_opt::preset_config("opt-125m", 0, 1048576, 0, 0), doctest::Contains("--hidden"), UsageError);
  CHECK_THROWS_WITH_AS(zo2_opt::preset_config("demo", 0, std::int64_t{1} << 62, 0, 0), doctest::Contains("--hidden"),
                       UsageError);
  CHECK_THROWS_WITH_AS(zo2_opt::preset_config("demo", 1 << 20, 0, 0, 0), doctest::Contains("--layers"), UsageError);
  CHECK_THROWS_WITH_AS(zo2_opt::preset_config("demo", 0, 0, 1 << 20, 0), doctest::Contains("--heads"), UsageError);
  CHECK_THROWS_WITH_AS(zo2_opt::preset_config("demo", 0, 0, 0, std::int64_t{1} << 40), doctest::Contains("--vocab-size"),
                       UsageError);
  CHECK_NOTHROW(zo2_opt::preset_config("opt-125m", 2, 128, 0, 0));
}

TEST_CASE("a model within the bounds but larger than memory is an error with its size, before any allocation") {
  // opt-175b at hidden 65536: ~5e12 parameters, ~20 TB in fp32.
  const auto config = zo2_opt::preset_config("opt-175b", 0, 65536, 0, 0);
  CHECK_THROWS_WITH_AS(zo2_opt::random_parameters(config, 1), doctest::Contains("GiB of host memory"), zo2::Error);
  const auto small = zo2_opt::random_parameters(zo2_opt::demo_config(), 1);
  CHECK(small.num_groups() == 4);
}

TEST_CASE("random initialisation draws 0.02 z per element, on all cores, for tensors of any length") {
  // vocab 200001 x hidden 6: an embedding of 1,200,006 elements, two 2^20 chunks and a tail
  // that ends inside a quad of normals.
  const auto config = zo2_opt::preset_config("opt-125m", 1, 6, 2, 200001);
  const auto source = zo2_opt::random_source(config, 77);
  const zo2::ModelLayout& ml = source->model_layout();
  std::size_t drawn = 0;
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    const zo2::ParamLayout& layout = ml.layout(zo2::GroupIndex{g});
    std::vector<float> flat(layout.total_elements());
    source->read_group(zo2::GroupIndex{g}, flat);
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      const std::string& name = layout.spec(r).name;
      if (name.ends_with(".bias") || name.find("layer_norm") != std::string::npos) continue;
      const std::uint32_t id = ml.first_tensor_id(zo2::GroupIndex{g}) + static_cast<std::uint32_t>(r);
      const float* t = flat.data() + layout.offset(r);
      std::size_t wrong = 0;
      for (std::size_t j = 0; j < layout.spec(r).numel(); ++j)
        wrong += t[j] != 0.02f * zo2::normal_at(77, 0xffffffffu, id, j);
      CHECK_MESSAGE(wrong == 0, name);
      drawn += layout.spec(r).numel();
    }
  }
  CHECK(drawn > 1200006);
}

TEST_CASE("state.json: a state as train writes it reads back, with its skipped steps") {
  TempDir tmp;
  const auto state = read_text(tmp, "good", good_state().dump(2));
  const zo2_opt::SavedProgress p = zo2_opt::saved_progress(state);
  CHECK(p.step == 15);
  CHECK(p.seed == 18446744073709551615ull);
  CHECK(p.skipped_steps == 3);
  // Checkpoints without the field: no skipped steps.
  auto old = good_state();
  old.erase("skipped_steps");
  old.erase("noise_scheme");
  CHECK(zo2_opt::saved_progress(read_text(tmp, "old", old.dump())).skipped_steps == 0);
}

TEST_CASE("state.json: integer fields of the wrong type, sign or range name the file and the field") {
  TempDir tmp;
  struct Case {
    const char* name;
    const char* field;  // as the message names it
    std::string text;   // state.json
  };
  // good_state() with one field's JSON text replaced by `value` (verbatim: 2^70, -3, 15.0).
  auto edited = [](nlohmann::json& field, const std::string& value, nlohmann::json& whole) {
    field = "__VALUE__";
    std::string text = whole.dump();
    const std::string marker = "\"__VALUE__\"";
    return text.replace(text.find(marker), marker.size(), value);
  };
  auto with = [&](const std::string& key, const std::string& value) {
    nlohmann::json j = good_state();
    return edited(j[key], value, j);
  };
  auto with_train = [&](const std::string& key, const std::string& value) {
    nlohmann::json j = good_state();
    return edited(j["train"][key], value, j);
  };
  nlohmann::json budget = good_state();
  budget["train"]["engine"]["gpu_memory_budget_gib"] = -1.0;
  nlohmann::json lr = good_state();
  lr["optimizer"]["lr"] = "fast";
  nlohmann::json train_null = good_state();
  train_null["train"] = nullptr;
  const Case cases[] = {
      {"negative_step", "'step'", with("step", "-3")},
      {"string_seed", "'seed'", with("seed", "\"42\"")},
      {"step_2_70", "'step'", with("step", "1180591620717411303424")},
      {"float_seed", "'seed'", with("seed", "3.5e25")},
      {"float_step", "'step'", with("step", "15.0")},
      {"step_past_counter", "'step'", with("step", "4294967296")},
      {"null_step", "'step'", with("step", "null")},
      {"negative_skipped", "'skipped_steps'", with("skipped_steps", "-1")},
      {"skipped_past_step", "'skipped_steps'", with("skipped_steps", "16")},
      {"noise_scheme", "'noise_scheme'", with("noise_scheme", "4294967296")},
      {"batch_zero", "'train.batch'", with_train("batch", "0")},
      {"batch_huge", "'train.batch'", with_train("batch", "1000000000")},
      {"total_steps", "'train.total_steps'", with_train("total_steps", "-1")},
      {"demo", "'train.demo'", with_train("demo", "\"yes\"")},
      {"data", "'train.data'", with_train("data", "7")},
      {"budget", "'train.engine.gpu_memory_budget_gib'", budget.dump()},
      {"lr", "'optimizer.lr'", lr.dump()},
      {"train_null", "'train'", train_null.dump()},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    CAPTURE(c.text);
    CHECK_THROWS_WITH_AS(read_text(tmp, c.name, c.text), doctest::Contains(c.field), zo2::FileError);
    CHECK_THROWS_WITH_AS(read_text(tmp, c.name, c.text), doctest::Contains("state.json"), zo2::FileError);
  }
  CHECK_THROWS_WITH_AS(read_text(tmp, "not_json", "{\"step\": "), doctest::Contains("not valid JSON"), zo2::FileError);
  CHECK_THROWS_WITH_AS(read_text(tmp, "no_seed", "{\"step\": 1}"), doctest::Contains("needs \"step\" and \"seed\""),
                       zo2::FileError);
}

// ---- the per-group state files: written and restored one group at a time ----------------------

namespace {

/// An engine with a rule state and encoded masters of known values and nothing else: the
/// checkpoint code's streaming of both files (shared by the CPU engine's rule state and the
/// CUDA offload engine's int8 masters) runs against it without a model or a GPU. It records
/// the order of the group calls and the buffer sizes they were handed.
class FakeStateEngine final : public zo2_opt::Engine {
 public:
  FakeStateEngine(unsigned slots, std::string codec, float seed)
      : layout_(make_prologue(), make_block(), 3, make_epilogue()), slots_(slots), codec_(std::move(codec)) {
    for (std::size_t g = 0; g < layout_.num_groups(); ++g) {
      std::vector<float> s(slots_ * layout_.layout(zo2::GroupIndex{g}).total_elements());
      for (std::size_t i = 0; i < s.size(); ++i) s[i] = seed + static_cast<float>(g) * 100.0f + static_cast<float>(i) * 0.25f;
      rule_.push_back(std::move(s));
      std::vector<unsigned char> e(7 + 3 * g);
      for (std::size_t i = 0; i < e.size(); ++i) e[i] = static_cast<unsigned char>(seed + g * 11 + i);
      encoded_.push_back(std::move(e));
    }
  }

  std::vector<std::vector<float>> rule_;
  std::vector<std::vector<unsigned char>> encoded_;
  std::vector<std::size_t> rule_gets, rule_sets, encoded_gets, encoded_sets;  // group order

  unsigned rule_state_slots() const override { return slots_; }
  void get_rule_state_group(zo2::GroupIndex g, std::span<float> out) override {
    REQUIRE(out.size() == rule_.at(g.value).size());
    std::copy(rule_[g.value].begin(), rule_[g.value].end(), out.begin());
    rule_gets.push_back(g.value);
  }
  void set_rule_state_group(zo2::GroupIndex g, std::span<const float> in) override {
    REQUIRE(in.size() == rule_.at(g.value).size());
    rule_[g.value].assign(in.begin(), in.end());
    rule_sets.push_back(g.value);
  }
  std::optional<std::string> encoded_codec() const override {
    return codec_.empty() ? std::nullopt : std::optional<std::string>(codec_);
  }
  std::size_t encoded_group_bytes(zo2::GroupIndex g) const override { return encoded_.at(g.value).size(); }
  void get_encoded_group(zo2::GroupIndex g, std::span<unsigned char> out) override {
    REQUIRE(out.size() == encoded_.at(g.value).size());
    std::copy(encoded_[g.value].begin(), encoded_[g.value].end(), out.begin());
    encoded_gets.push_back(g.value);
  }
  void set_encoded_group(zo2::GroupIndex g, std::span<const unsigned char> in) override {
    REQUIRE(in.size() == encoded_.at(g.value).size());
    encoded_[g.value].assign(in.begin(), in.end());
    encoded_sets.push_back(g.value);
  }
  const zo2::ModelLayout& model_layout() const override { return layout_; }

  // Not used by the checkpoint's state files.
  zo2::StepResult step(const zo2_opt::TokenBatch&) override { throw zo2::Error("unused"); }
  zo2::StepResult step_accumulated(std::span<const zo2_opt::TokenBatch>) override { throw zo2::Error("unused"); }
  void restore_progress(const zo2::OptimizerState&) override { throw zo2::Error("unused"); }
  double loss(const zo2_opt::TokenBatch&) override { throw zo2::Error("unused"); }
  std::vector<float> logits(std::span<const std::int32_t>) override { throw zo2::Error("unused"); }
  std::vector<double> score_candidates(std::span<const std::int32_t>, const std::vector<std::vector<std::int32_t>>&) override {
    throw zo2::Error("unused");
  }
  void flush() override {}
  void read_group(zo2::GroupIndex, std::span<float>) override { throw zo2::Error("unused"); }
  zo2::OptimizerState state() const override { return {}; }
  std::string device_description() const override { return "fake"; }

 private:
  static zo2::ParamLayout make_prologue() {
    zo2::ParamLayout l;
    l.add("embed.weight", {3, 4});
    return l;
  }
  static zo2::ParamLayout make_block() {
    zo2::ParamLayout l;
    l.add("fc.weight", {2, 5});
    l.add("fc.bias", {2}, false);
    return l;
  }
  static zo2::ParamLayout make_epilogue() {
    zo2::ParamLayout l;
    l.add("norm.weight", {2}, false);
    return l;
  }

  zo2::ModelLayout layout_;
  unsigned slots_;
  std::string codec_;
};

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<std::size_t> in_order(std::size_t n) {
  std::vector<std::size_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

}  // namespace

TEST_CASE("optimizer_state.safetensors: written and restored group by group, bytes as the whole-state writer's") {
  TempDir tmp;
  FakeStateEngine saved(2, "", 1.0f);
  const std::size_t groups = saved.model_layout().num_groups();
  REQUIRE(!zo2_opt::encoded_state_source(saved));  // no codec: no offload_state.safetensors
  const auto source = zo2_opt::rule_state_source(saved);
  REQUIRE(source);
  const fs::path streamed = tmp.path / "streamed", whole = tmp.path / "whole";
  fs::create_directories(streamed);
  fs::create_directories(whole);
  zo2_opt::write_group_state(streamed / zo2_opt::kRuleStateFile, *source);
  CHECK(saved.rule_gets == in_order(groups));  // each group read once, in order
  CHECK(std::distance(fs::directory_iterator(streamed), fs::directory_iterator()) == 1);  // no scratch left

  // The format the checkpoints before streaming wrote (io::write_safetensors of the whole state).
  std::vector<zo2::io::TensorToWrite> tensors;
  for (std::size_t g = 0; g < groups; ++g)
    tensors.push_back({"group." + std::to_string(g), zo2::io::Dtype::F32,
                       {static_cast<std::int64_t>(saved.rule_[g].size())}, saved.rule_[g].data()});
  zo2::io::write_safetensors(whole / zo2_opt::kRuleStateFile, tensors, {{"slots", "2"}, {"groups", std::to_string(groups)}});
  CHECK(file_bytes(streamed / zo2_opt::kRuleStateFile) == file_bytes(whole / zo2_opt::kRuleStateFile));

  const auto read = zo2_opt::read_rule_state(streamed);
  REQUIRE(read);
  CHECK(read->slots == 2);
  CHECK(read->groups == saved.rule_);

  for (const fs::path& dir : {streamed, whole}) {  // the new files and the old ones resume alike
    FakeStateEngine restored(2, "", 50.0f);
    const auto file = zo2_opt::GroupStateFile::open_rule_state(dir);
    REQUIRE(file);
    CHECK(file->slots() == 2);
    CHECK(file->groups() == groups);
    zo2_opt::restore_rule_state(restored, *file);
    CHECK(restored.rule_sets == in_order(groups));
    CHECK(restored.rule_ == saved.rule_);
  }

  // Another slot count, or a group of another size, is refused before any group is set.
  FakeStateEngine other_rule(1, "", 0.0f);
  CHECK_THROWS_WITH_AS(zo2_opt::restore_rule_state(other_rule, *zo2_opt::GroupStateFile::open_rule_state(streamed)),
                       doctest::Contains("2 values per weight"), zo2::Error);
  CHECK(other_rule.rule_sets.empty());
  tensors.back().shape = {static_cast<std::int64_t>(saved.rule_.back().size() - 1)};
  zo2::io::write_safetensors(whole / zo2_opt::kRuleStateFile, tensors, {{"slots", "2"}, {"groups", std::to_string(groups)}});
  FakeStateEngine short_group(2, "", 0.0f);
  CHECK_THROWS_WITH_AS(zo2_opt::restore_rule_state(short_group, *zo2_opt::GroupStateFile::open_rule_state(whole)),
                       doctest::Contains(("group " + std::to_string(groups - 1)).c_str()), zo2::Error);
  CHECK(short_group.rule_sets.empty());

  // A tensor of the wrong dtype or a missing group names the file when it is opened.
  tensors.back().dtype = zo2::io::Dtype::U8;
  tensors.back().shape = {3};
  zo2::io::write_safetensors(whole / zo2_opt::kRuleStateFile, tensors, {{"slots", "2"}, {"groups", std::to_string(groups)}});
  CHECK_THROWS_WITH_AS(zo2_opt::GroupStateFile::open_rule_state(whole), doctest::Contains("optimizer_state.safetensors"),
                       zo2::FileError);
  tensors.pop_back();
  zo2::io::write_safetensors(whole / zo2_opt::kRuleStateFile, tensors, {{"slots", "2"}, {"groups", std::to_string(groups)}});
  CHECK_THROWS_WITH_AS(zo2_opt::GroupStateFile::open_rule_state(whole),
                       doctest::Contains(("group." + std::to_string(groups - 1)).c_str()), zo2::FileError);
  CHECK(!zo2_opt::GroupStateFile::open_rule_state(tmp.path));  // no file: nothing to restore
}

TEST_CASE("offload_state.safetensors (the int8 codec's masters): written and restored group by group") {
  TempDir tmp;
  FakeStateEngine saved(0, "int8", 3.0f);
  const std::size_t groups = saved.model_layout().num_groups();
  REQUIRE(!zo2_opt::rule_state_source(saved));  // a rule without state: no optimizer_state.safetensors
  const auto source = zo2_opt::encoded_state_source(saved);
  REQUIRE(source);
  const fs::path streamed = tmp.path / "streamed", whole = tmp.path / "whole";
  fs::create_directories(streamed);
  fs::create_directories(whole);
  zo2_opt::write_group_state(streamed / zo2_opt::kEncodedStateFile, *source);
  CHECK(saved.encoded_gets == in_order(groups));

  std::vector<zo2::io::TensorToWrite> tensors;
  for (std::size_t g = 0; g < groups; ++g)
    tensors.push_back({"group." + std::to_string(g), zo2::io::Dtype::U8,
                       {static_cast<std::int64_t>(saved.encoded_[g].size())}, saved.encoded_[g].data()});
  zo2::io::write_safetensors(whole / zo2_opt::kEncodedStateFile, tensors, {{"codec", "int8"}, {"groups", std::to_string(groups)}});
  CHECK(file_bytes(streamed / zo2_opt::kEncodedStateFile) == file_bytes(whole / zo2_opt::kEncodedStateFile));

  const auto read = zo2_opt::read_encoded_state(streamed);
  REQUIRE(read);
  CHECK(read->codec == "int8");
  CHECK(read->groups == saved.encoded_);

  for (const fs::path& dir : {streamed, whole}) {
    FakeStateEngine restored(0, "int8", 9.0f);
    const auto file = zo2_opt::GroupStateFile::open_encoded_state(dir);
    REQUIRE(file);
    CHECK(file->codec() == "int8");
    zo2_opt::restore_encoded_state(restored, *file);
    CHECK(restored.encoded_sets == in_order(groups));
    CHECK(restored.encoded_ == saved.encoded_);
  }

  FakeStateEngine other_codec(0, "bf16", 0.0f);
  CHECK_THROWS_WITH_AS(zo2_opt::restore_encoded_state(other_codec, *zo2_opt::GroupStateFile::open_encoded_state(streamed)),
                       doctest::Contains("does not fit this run"), zo2::Error);
  CHECK(other_codec.encoded_sets.empty());
  FakeStateEngine no_codec(0, "", 0.0f);
  CHECK_THROWS_AS(zo2_opt::restore_encoded_state(no_codec, *zo2_opt::GroupStateFile::open_encoded_state(streamed)),
                  zo2::Error);
}

TEST_CASE("save_checkpoint writes both state files into the checkpoint it renames into place") {
  TempDir tmp;
  FakeStateEngine engine(2, "int8", 5.0f);
  const auto rule = zo2_opt::rule_state_source(engine);
  const auto encoded = zo2_opt::encoded_state_source(engine);
  zo2::opt::OPTConfig tiny;
  tiny.hidden_size = tiny.word_embed_proj_dim = 8;
  tiny.ffn_dim = 16;
  tiny.num_hidden_layers = 2;
  tiny.num_attention_heads = 2;
  tiny.vocab_size = 32;
  tiny.max_position_embeddings = 16;
  const zo2_opt::ModelConfig config(tiny);
  const zo2::ModelLayout layout = zo2_opt::model_layout(config);
  zo2::ParameterStore<float> store(layout);
  const fs::path saved = zo2_opt::save_checkpoint(tmp.path / "ck", 7, config, layout, zo2_opt::store_reader(store), nullptr,
                                                  good_state(), &*encoded, &*rule);
  CHECK(saved.filename() == "step-00000007");
  CHECK(zo2_opt::read_rule_state(saved)->groups == engine.rule_);
  CHECK(zo2_opt::read_encoded_state(saved)->groups == engine.encoded_);
  for (const auto& entry : fs::directory_iterator(tmp.path / "ck"))  // nothing but the checkpoint
    CHECK(entry.path().filename() == "step-00000007");
  for (const auto& entry : fs::directory_iterator(saved)) CHECK(!entry.is_directory());
}
