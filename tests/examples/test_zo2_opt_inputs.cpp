// zo2-opt's input checks, on the example's own sources: command-line values outside a flag's
// range, model overrides beyond OPTConfig's bounds or the machine's memory, and state.json
// fields of the wrong type or range all end in one-line errors naming the flag, file and field.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>

#include "checkpoint.hpp"
#include "cli.hpp"
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
