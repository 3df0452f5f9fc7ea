// Checkpoints group by group (host memory): CheckpointGroups (OPT and LLaMA) yields
// exactly the values the ParameterStore loaders give; exports into shards of bounded size with
// transformers' index re-load to identical parameters; ShardedSafetensorsWriter's contract; and
// a truncated or inconsistent shard is an error naming the file.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/io/safetensors.hpp>
#include <zo2/models/llama/loader.hpp>
#include <zo2/models/opt/loader.hpp>

#include "../support/llama_fixtures.hpp"
#include "../support/opt_fixtures.hpp"

namespace {

namespace fs = std::filesystem;
using zo2::GroupIndex;
using zo2::io::Dtype;

fs::path opt_fixture(const std::string& name) { return zo2_test::opt_fixtures::fixture(name); }
fs::path llama_fixture(const std::string& name) { return zo2_test::llama_fixtures::fixture(name); }

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_checkpoint_groups_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

/// Every group of `groups` read into a store, in reverse order (the reader has no cursor).
template <class Groups>
zo2::ParameterStore<float> store_of(const Groups& groups) {
  zo2::ParameterStore<float> store(groups.model_layout());
  for (std::size_t g = store.num_groups(); g-- > 0;) {
    auto view = store.group(GroupIndex{g});
    groups.read_group(GroupIndex{g}, std::span<float>(view.data(), view.layout().total_elements()));
  }
  return store;
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

/// The shard files an index lists, and checks on it as transformers writes it.
std::set<std::string> check_index(const fs::path& dir, std::uint64_t max_shard_bytes) {
  const nlohmann::json index = read_json(dir / "model.safetensors.index.json");
  REQUIRE(index.contains("metadata"));
  REQUIRE(index.contains("weight_map"));
  std::set<std::string> files;
  std::uint64_t total = 0;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  for (const std::string& file : files) {
    const auto shard = zo2::io::SafetensorsFile::open(dir / file);
    std::uint64_t bytes = 0;
    for (const auto& e : shard.entries()) {
      bytes += e.bytes.size();
      CHECK(index["weight_map"].at(e.name) == file);
    }
    // A shard holds at most max_shard_bytes of data unless one tensor alone is larger.
    CHECK((bytes <= max_shard_bytes || shard.entries().size() == 1));
    CHECK(shard.metadata().at("format") == "pt");
    total += bytes;
  }
  CHECK(index["metadata"].at("total_size").get<std::uint64_t>() == total);
  CHECK(files.size() > 1);
  std::size_t i = 1;
  for (const std::string& file : files)
    CHECK(file == zo2::io::shard_file_name(i++ - 1, files.size()));
  return files;
}

}  // namespace

TEST_CASE("CheckpointGroups gives exactly the ParameterStore loader's values (OPT)") {
  for (const char* name : {"opt_preln", "opt_preln_sharded", "opt_postln_proj", "opt_nobias_bf16"}) {
    CAPTURE(name);
    const auto loaded = zo2::opt::load_opt_checkpoint<float>(opt_fixture(name));
    const zo2::opt::CheckpointGroups groups(opt_fixture(name), loaded.config);
    CHECK(store_of(groups) == loaded.store);

    // Against the file read tensor by tensor, and padding zero.
    const auto checkpoint = zo2::io::SafetensorsCheckpoint::open(opt_fixture(name));
    const auto& ml = groups.model_layout();
    std::size_t visited = 0;
    groups.for_each_group([&](GroupIndex g, std::span<const float> flat) {
      CHECK(g.value == visited++);
      const zo2::ParamLayout& l = ml.layout(g);
      std::vector<bool> covered(flat.size(), false);
      for (std::size_t r = 0; r < l.num_tensors(); ++r) {
        const std::string hf = g.value == 0 || g.value == ml.num_groups() - 1
                                   ? zo2::opt::hf_prologue_name(l.spec(r).name)
                                   : zo2::opt::hf_block_name(g.value - 1, l.spec(r).name);
        const std::vector<float> want = checkpoint.read_as_float(hf);
        CHECK(std::memcmp(flat.data() + l.offset(r), want.data(), want.size() * sizeof(float)) == 0);
        for (std::size_t j = 0; j < want.size(); ++j) covered[l.offset(r) + j] = true;
      }
      for (std::size_t j = 0; j < flat.size(); ++j)
        if (!covered[j]) CHECK(flat[j] == 0.0f);
    });
    CHECK(visited == ml.num_groups());
  }
}

TEST_CASE("CheckpointGroups gives exactly the ParameterStore loader's values (LLaMA family)") {
  for (const char* name : {"llama_gqa", "llama_mqa_tied_bf16", "llama3_rope_bf16", "mistral_window",
                           "qwen2_bias_bf16", "qwen2_bias_bf16_sharded", "qwen3_qknorm_fp16"}) {
    CAPTURE(name);
    const auto loaded = zo2::llama::load_llama_checkpoint<float>(llama_fixture(name));
    const zo2::llama::CheckpointGroups groups(llama_fixture(name), loaded.config);
    CHECK(store_of(groups) == loaded.store);
  }
}

TEST_CASE("read_group refuses a buffer of the wrong size or a group out of range") {
  const auto loaded = zo2::opt::load_opt_checkpoint<float>(opt_fixture("opt_preln"));
  const zo2::opt::CheckpointGroups groups(opt_fixture("opt_preln"), loaded.config);
  std::vector<float> small(3);
  CHECK_THROWS_AS(groups.read_group(GroupIndex{1}, small), zo2::ShapeError);
  CHECK_THROWS_AS(groups.read_group(GroupIndex{groups.num_groups()}, small), zo2::Error);
}

TEST_CASE("A sharded OPT export re-loads to identical parameters, and a single save replaces it") {
  TempDir tmp;
  for (const char* name : {"opt_preln", "opt_postln_proj"}) {
    CAPTURE(name);
    const auto original = zo2::opt::load_opt_checkpoint<float>(opt_fixture(name));
    const fs::path dir = tmp.path / name;
    constexpr std::uint64_t kMax = 8192;
    zo2::opt::save_hf_checkpoint(dir, original.config, original.store, Dtype::F32, kMax);
    CHECK_FALSE(fs::exists(dir / "model.safetensors"));
    const std::set<std::string> files = check_index(dir, kMax);
    const auto back = zo2::opt::load_opt_checkpoint<float>(dir);
    CHECK(back.config == original.config);
    CHECK(back.store == original.store);
    for (const auto& entry : fs::directory_iterator(dir))  // no temporary file left behind
      CHECK(entry.path().filename().string().find(".tmp.") == std::string::npos);

    // BF16 shards: the store rounded to nearest, as the single-file export writes it.
    const fs::path bf16 = tmp.path / (std::string(name) + "_bf16");
    const fs::path bf16_single = tmp.path / (std::string(name) + "_bf16_single");
    zo2::opt::save_hf_checkpoint(bf16, original.config, original.store, Dtype::BF16, kMax / 2);
    zo2::opt::save_hf_checkpoint(bf16_single, original.config, original.store, Dtype::BF16);
    check_index(bf16, kMax / 2);
    CHECK(zo2::opt::load_opt_checkpoint<zo2::bfloat16>(bf16).store ==
          zo2::opt::load_opt_checkpoint<zo2::bfloat16>(bf16_single).store);

    // Saving a single file over the shards leaves no index or shard that could shadow it.
    zo2::opt::save_hf_checkpoint(dir, original.config, original.store);
    CHECK_FALSE(fs::exists(dir / "model.safetensors.index.json"));
    for (const std::string& file : files) CHECK_FALSE(fs::exists(dir / file));
    CHECK(zo2::opt::load_opt_checkpoint<float>(dir).store == original.store);
    // And shards over a single file remove it (transformers would load it before the index).
    zo2::opt::save_hf_checkpoint(dir, original.config, original.store, Dtype::F32, kMax);
    CHECK_FALSE(fs::exists(dir / "model.safetensors"));
    CHECK(zo2::opt::load_opt_checkpoint<float>(dir).store == original.store);
  }
}

TEST_CASE("A sharded LLaMA-family export re-loads to identical parameters") {
  TempDir tmp;
  for (const char* name : {"llama_gqa", "llama_mqa_tied_bf16", "qwen2_bias_bf16_sharded", "qwen3_qknorm_fp16"}) {
    CAPTURE(name);
    const auto original = zo2::llama::load_llama_checkpoint<float>(llama_fixture(name));
    const fs::path dir = tmp.path / name;
    zo2::llama::save_hf_checkpoint(dir, original.config, original.store, Dtype::F32, 4096);
    check_index(dir, 4096);
    const auto back = zo2::llama::load_llama_checkpoint<float>(dir);
    CHECK(back.config == original.config);
    CHECK(back.store == original.store);
  }
}

TEST_CASE("save_hf_checkpoint_by_group writes what save_hf_checkpoint writes, reading each group once in order") {
  TempDir tmp;
  const auto original = zo2::opt::load_opt_checkpoint<float>(opt_fixture("opt_preln"));
  const zo2::opt::CheckpointGroups groups(opt_fixture("opt_preln"), original.config);
  std::vector<std::size_t> order;
  const fs::path by_group = tmp.path / "by_group", from_store = tmp.path / "from_store";
  zo2::opt::save_hf_checkpoint_by_group(
      by_group, original.config, groups.model_layout(),
      [&](GroupIndex g, std::span<float> flat) {
        order.push_back(g.value);
        groups.read_group(g, flat);
      },
      Dtype::F32, 10000);
  zo2::opt::save_hf_checkpoint(from_store, original.config, original.store, Dtype::F32, 10000);
  std::vector<std::size_t> expected(groups.num_groups());
  for (std::size_t g = 0; g < expected.size(); ++g) expected[g] = g;
  CHECK(order == expected);
  for (const auto& entry : fs::directory_iterator(from_store)) {
    CAPTURE(entry.path().filename().string());
    std::ifstream a(entry.path(), std::ios::binary), b(by_group / entry.path().filename(), std::ios::binary);
    REQUIRE(b);
    const std::string x((std::istreambuf_iterator<char>(a)), {}), y((std::istreambuf_iterator<char>(b)), {});
    CHECK(x == y);
  }

  // LLaMA family: the same.
  const auto llama = zo2::llama::load_llama_checkpoint<float>(llama_fixture("qwen2_bias_bf16"));
  const zo2::llama::CheckpointGroups llama_groups(llama_fixture("qwen2_bias_bf16"), llama.config);
  zo2::llama::save_hf_checkpoint_by_group(
      tmp.path / "llama_by_group", llama.config, llama_groups.model_layout(),
      [&](GroupIndex g, std::span<float> flat) { llama_groups.read_group(g, flat); }, Dtype::BF16, 3000);
  CHECK(zo2::llama::load_llama_checkpoint<float>(tmp.path / "llama_by_group").store ==
        zo2::llama::load_llama_checkpoint<float>(llama_fixture("qwen2_bias_bf16")).store);  // bf16-exact fixture
}

TEST_CASE("A truncated or inconsistent shard is an error naming the file") {
  TempDir tmp;
  const fs::path source = opt_fixture("opt_preln_sharded");
  const auto config = zo2::opt::OPTConfig::from_json_file(source / "config.json");
  auto copy = [&](const std::string& name) {
    const fs::path dir = tmp.path / name;
    fs::create_directories(dir);
    for (const auto& entry : fs::directory_iterator(source)) fs::copy_file(entry.path(), dir / entry.path().filename());
    return dir;
  };

  // The data section cut short: the header's offsets reach past the end of the file.
  const fs::path cut = copy("cut");
  fs::resize_file(cut / "model-00002-of-00003.safetensors", fs::file_size(cut / "model-00002-of-00003.safetensors") - 100);
  CHECK_THROWS_WITH_AS(zo2::opt::CheckpointGroups(cut, config), doctest::Contains("model-00002-of-00003.safetensors"),
                       zo2::FileError);
  CHECK_THROWS_WITH_AS(zo2::opt::CheckpointGroups(cut, config), doctest::Contains("truncated"), zo2::FileError);

  // Cut inside the header.
  const fs::path header = copy("header");
  fs::resize_file(header / "model-00003-of-00003.safetensors", 20);
  CHECK_THROWS_WITH_AS(zo2::opt::CheckpointGroups(header, config),
                       doctest::Contains("model-00003-of-00003.safetensors"), zo2::FileError);

  // The index maps a tensor to a shard that does not hold it.
  const fs::path moved = copy("moved");
  {
    nlohmann::json index = read_json(moved / "model.safetensors.index.json");
    index["weight_map"]["model.decoder.layers.1.fc2.bias"] = "model-00001-of-00003.safetensors";
    std::ofstream(moved / "model.safetensors.index.json") << index.dump(2);
  }
  CHECK_THROWS_WITH_AS(zo2::opt::CheckpointGroups(moved, config),
                       doctest::Contains("model-00001-of-00003.safetensors', which does not contain it"), zo2::FileError);

  // A shard whose tensor disagrees with config.json names that shard.
  const fs::path wrong = copy("wrong");
  {
    const auto shard = zo2::io::SafetensorsFile::open(source / "model-00003-of-00003.safetensors");
    std::vector<zo2::io::TensorToWrite> tensors;
    std::vector<float> longer;
    for (const auto& e : shard.entries()) {
      if (e.name == "model.decoder.layers.1.fc2.bias") {
        longer.assign(static_cast<std::size_t>(e.shape[0]) + 1, 0.5f);
        tensors.push_back({e.name, Dtype::F32, {e.shape[0] + 1}, longer.data()});
      } else {
        tensors.push_back({e.name, e.dtype, e.shape, e.bytes.data()});
      }
    }
    REQUIRE_FALSE(longer.empty());
    zo2::io::write_safetensors(wrong / "model-00003-of-00003.safetensors", tensors);
  }
  CHECK_THROWS_WITH_AS(zo2::opt::CheckpointGroups(wrong, config),
                       doctest::Contains("model-00003-of-00003.safetensors: tensor 'model.decoder.layers.1.fc2.bias' "
                                         "has shape"),
                       zo2::FileError);

  // A shard missing altogether.
  const fs::path missing = copy("missing");
  fs::remove(missing / "model-00002-of-00003.safetensors");
  CHECK_THROWS_WITH_AS(zo2::opt::CheckpointGroups(missing, config),
                       doctest::Contains("shard 'model-00002-of-00003.safetensors'"), zo2::FileError);

  // The LLaMA family's reader, the same.
  const fs::path llama_source = llama_fixture("qwen2_bias_bf16_sharded");
  const auto llama_config = zo2::llama::LlamaConfig::from_json_file(llama_source / "config.json");
  const fs::path llama_cut = tmp.path / "llama_cut";
  fs::create_directories(llama_cut);
  for (const auto& entry : fs::directory_iterator(llama_source))
    fs::copy_file(entry.path(), llama_cut / entry.path().filename());
  fs::resize_file(llama_cut / "model-00003-of-00003.safetensors",
                  fs::file_size(llama_cut / "model-00003-of-00003.safetensors") - 1);
  CHECK_THROWS_WITH_AS(zo2::llama::CheckpointGroups(llama_cut, llama_config),
                       doctest::Contains("model-00003-of-00003.safetensors"), zo2::FileError);
}

TEST_CASE("ShardedSafetensorsWriter: order, sizes, limits and an unfinished write") {
  TempDir tmp;
  using zo2::io::ShardedSafetensorsWriter;
  const std::vector<float> a(10, 1.0f), b(300, 2.0f), c(5, 3.0f);
  auto bytes = [](const std::vector<float>& v) { return std::as_bytes(std::span<const float>(v)); };
  const std::vector<zo2::io::TensorHeader> headers = {
      {"a", Dtype::F32, {10}}, {"b", Dtype::F32, {300}}, {"c", Dtype::F32, {5}}};

  SUBCASE("a tensor larger than the limit gets a shard of its own") {
    const fs::path dir = tmp.path / "own";
    fs::create_directories(dir);
    ShardedSafetensorsWriter w(dir, headers, 100);
    CHECK(w.num_shards() == 3);
    w.write("a", bytes(a));
    w.write("b", bytes(b));
    w.write("c", bytes(c));
    w.finish();
    const auto checkpoint = zo2::io::SafetensorsCheckpoint::open(dir);
    CHECK(checkpoint.shards().size() == 3);
    CHECK(checkpoint.read_as_float("b") == b);
    CHECK(checkpoint.read_as_float("c") == c);
  }
  SUBCASE("everything under the limit is one model.safetensors") {
    const fs::path dir = tmp.path / "one";
    fs::create_directories(dir);
    ShardedSafetensorsWriter w(dir, headers);
    CHECK(w.file_names() == std::vector<std::string>{"model.safetensors"});
    w.write("a", bytes(a));
    w.write("b", bytes(b));
    w.write("c", bytes(c));
    w.finish();
    CHECK_FALSE(fs::exists(dir / "model.safetensors.index.json"));
    CHECK(zo2::io::SafetensorsFile::open(dir / "model.safetensors").read_as_float("a") == a);
  }
  SUBCASE("out of order, wrong size, a duplicate name and an early finish are refused") {
    const fs::path dir = tmp.path / "bad";
    fs::create_directories(dir);
    {
      ShardedSafetensorsWriter w(dir, headers, 100);
      CHECK_THROWS_WITH_AS(w.write("b", bytes(b)), doctest::Contains("where 'a' comes next"), zo2::FileError);
      CHECK_THROWS_WITH_AS(w.write("a", bytes(c)), doctest::Contains("need 40"), zo2::FileError);
      w.write("a", bytes(a));
      CHECK_THROWS_WITH_AS(w.finish(), doctest::Contains("before tensor 'b'"), zo2::FileError);
    }
    // The abandoned writer left no temporary file.
    for (const auto& entry : fs::directory_iterator(dir))
      CHECK(entry.path().filename().string().find(".tmp.") == std::string::npos);
    CHECK_THROWS_WITH_AS(ShardedSafetensorsWriter(dir, {{"a", Dtype::F32, {1}}, {"a", Dtype::F32, {1}}}),
                         doctest::Contains("given twice"), zo2::FileError);
  }
  SUBCASE("no tensors: one empty model.safetensors") {
    const fs::path dir = tmp.path / "empty";
    fs::create_directories(dir);
    ShardedSafetensorsWriter w(dir, {});
    w.finish();
    CHECK(zo2::io::SafetensorsFile::open(dir / "model.safetensors").entries().empty());
  }
}
