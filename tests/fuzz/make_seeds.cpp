// Writes the seed corpus of the fuzz harnesses (tests/fuzz/corpus/<harness>/seed-*) with zo2's
// own writers, so every seed is an input the parsers accept (plus a few near misses). The
// committed corpus was made by it: build the target zo2_fuzz_make_seeds (ZO2_BUILD_FUZZERS=ON)
// and run it with the corpus directory:  zo2_fuzz_make_seeds tests/fuzz/corpus
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/io/bpe_tokenizer.hpp>
#include <zo2/io/safetensors.hpp>
#include <zo2/models/opt/loader.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/packed_bf16.hpp>

#include "fuzz_common.hpp"

namespace fs = std::filesystem;

namespace {

fs::path corpus;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void seed(const std::string& harness, const std::string& name, const std::string& bytes) {
  fs::create_directories(corpus / harness);
  std::ofstream(corpus / harness / ("seed-" + name), std::ios::binary) << bytes;
}

std::string join(std::initializer_list<std::string> parts) {
  std::string out;
  for (const std::string& p : parts) out += (out.empty() ? "" : std::string(zo2_fuzz::kPartSeparator)) + p;
  return out;
}

/// A safetensors file made by write_safetensors, as bytes.
std::string safetensors(const std::vector<zo2::io::TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata = {}) {
  const fs::path tmp = zo2_fuzz::scratch_dir() / "seed.safetensors";
  zo2::io::write_safetensors(tmp, tensors, metadata);
  return slurp(tmp);
}

zo2::opt::OPTConfig tiny_config(bool projection, bool bias) {
  zo2::opt::OPTConfig c;
  c.hidden_size = 4;
  c.ffn_dim = 8;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.vocab_size = 6;
  c.max_position_embeddings = 3;
  c.word_embed_proj_dim = projection ? 2 : 4;
  c.do_layer_norm_before = !projection;
  c.enable_bias = bias;
  c.pad_token_id = 1;
  c.bos_token_id = c.eos_token_id = 2;
  return c;
}

/// config.json and model.safetensors (bf16) of a tiny OPT model, saved by save_hf_checkpoint.
std::pair<std::string, std::string> tiny_checkpoint(const zo2::opt::OPTConfig& c) {
  zo2::ParameterStore<float> store(zo2::opt::model_layout(c));
  float v = 0.25f;
  for (std::size_t g = 0; g < store.model_layout().num_groups(); ++g) {
    auto view = store.group(zo2::GroupIndex{g});
    for (std::size_t r = 0; r < view.layout().num_tensors(); ++r)
      for (std::size_t j = 0; j < view.layout().spec(r).numel(); ++j) view.tensor(r)[j] = (v = -v * 1.03125f);
  }
  const fs::path dir = zo2_fuzz::scratch_dir() / "tiny";
  zo2::opt::save_hf_checkpoint(dir, c, store, zo2::io::Dtype::BF16);
  return {slurp(dir / "config.json"), slurp(dir / "model.safetensors")};
}

/// The built-in byte vocabulary (OPT's four specials, then one token per byte) and a few
/// merges of it.
std::pair<std::string, std::string> byte_bpe() {
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  const char* specials[] = {"<s>", "<pad>", "</s>", "<unk>"};
  for (int s = 0; s < 4; ++s) vocab[specials[s]] = s;
  const auto& table = zo2::io::bpe_detail::byte_to_code_point();
  auto sym = [&](unsigned char b) {
    std::string out;
    zo2::io::unicode::append_utf8(out, table[b]);
    return out;
  };
  for (unsigned b = 0; b < 256; ++b) vocab[sym(static_cast<unsigned char>(b))] = 4 + b;
  std::string merges = "#version: 0.2\n";
  int next = 260;
  for (const auto& [l, r] : std::vector<std::pair<std::string, std::string>>{
           {sym(' '), "t"}, {"h", "e"}, {sym(' ') + "t", "he"}, {"i", "n"}, {"a", "n"}, {"e", "r"}}) {
    merges += l + " " + r + "\n";
    vocab[l + r] = next++;
  }
  return {vocab.dump(), merges};
}

const zo2::ParamLayout& encoded_state_layout() {  // as fuzz_encoded_state.cpp's small_layout()
  static const zo2::ParamLayout layout = [] {
    zo2::ParamLayout l;
    l.add("q.weight", {4, 8});
    l.add("q.bias", {4}, false);
    l.add("fc.weight", {3, 33});
    return l;
  }();
  return layout;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  corpus = argv[1];
  using zo2::io::Dtype;

  // ---- safetensors ----
  const float f32[6] = {1.5f, -2.0f, 0.0f, 3.25f, 1e-3f, -7.0f};
  const std::uint16_t b16[4] = {0x3f80, 0xc000, 0x0000, 0x7f80};
  const std::int64_t i64[2] = {7, -1};
  const std::string tiny = safetensors({{"layer.weight", Dtype::F32, {2, 3}, f32},
                                        {"layer.bias", Dtype::BF16, {4}, b16},
                                        {"counts", Dtype::I64, {2}, i64},
                                        {"empty", Dtype::F32, {0, 3}, nullptr}},
                                       {{"format", "pt"}});
  seed("safetensors", "tiny", tiny);
  seed("safetensors", "fixture", slurp(fs::path(ZO2_FUZZ_SOURCE_DIR) / "../fixtures/safetensors/tiny.safetensors"));
  seed("safetensors", "f16-scalar", safetensors({{"s", Dtype::F16, {}, b16}}));
  seed("safetensors", "no-tensors", safetensors({}, {{"k", "v"}}));

  // ---- sharded index ----
  const std::string shard1 = safetensors({{"a.weight", Dtype::F32, {3}, f32}, {"b.weight", Dtype::BF16, {2, 2}, b16}});
  const std::string shard2 = safetensors({{"c.bias", Dtype::F32, {2}, f32 + 3}});
  const nlohmann::ordered_json index = {
      {"metadata", {{"total_size", 28}}},
      {"weight_map",
       {{"a.weight", "model-00001-of-00002.safetensors"}, {"b.weight", "model-00001-of-00002.safetensors"},
        {"c.bias", "model-00002-of-00002.safetensors"}}}};
  seed("safetensors_index", "two-shards", join({index.dump(1), shard1, shard2}));
  nlohmann::ordered_json one = {{"weight_map", {{"c.bias", "model-00002-of-00002.safetensors"}}}};
  seed("safetensors_index", "second-only", join({one.dump(), "", shard2}));
  nlohmann::ordered_json escape = {{"weight_map", {{"a.weight", "../model-00001-of-00002.safetensors"}}}};
  seed("safetensors_index", "escape", join({escape.dump(), shard1}));

  // ---- config.json and checkpoints ----
  const auto [config_a, weights_a] = tiny_checkpoint(tiny_config(false, true));
  const auto [config_b, weights_b] = tiny_checkpoint(tiny_config(true, false));
  seed("opt_config", "tiny", config_a);
  seed("opt_config", "projection", config_b);
  seed("opt_config", "fixture-preln", slurp(fs::path(ZO2_FUZZ_SOURCE_DIR) / "../fixtures/opt/opt_preln/config.json"));
  seed("opt_config", "nulls",
       R"({"model_type":"opt","hidden_size":8,"ffn_dim":16,"num_hidden_layers":2,"num_attention_heads":2,)"
       R"("vocab_size":50,"max_position_embeddings":16,"word_embed_proj_dim":null,"pad_token_id":null,)"
       R"("bos_token_id":null,"eos_token_id":null,"activation_function":"gelu_new","enable_bias":false})");
  seed("opt_loader", "tiny", join({config_a, weights_a}));
  seed("opt_loader", "projection", join({config_b, weights_b}));
  seed("opt_loader", "mismatch", join({config_b, weights_a}));

  // ---- tokenizer ----
  const auto [vocab, merges] = byte_bpe();
  seed("bpe", "bytes-merges", join({vocab, merges, "Hello there, the winter</s> in 2024's <s>café\n\n  end"}));
  seed("bpe", "bytes-only", join({vocab, "#version: 0.2\n", "ab</s></s><pad>x"}));
  seed("bpe", "small", join({R"({"a":0,"b":1,"ab":2,"</s>":3})", "a b\n", "abab</s>ba"}));

  // ---- datasets (first byte: options, see fuzz_data.cpp) ----
  seed("data", "lm-jsonl", std::string(1, '\x14') + "{\"text\": \"Once upon a time</s> there\"}\n\n{\"text\": \"x\"}\n");
  seed("data", "classification",
       std::string(1, '\xa6') + "{\"prompt\": \"A fine film.\", \"label\": \"great\"}\n"
                                "{\"prompt\": \"Dull and long, far too long for the window.\", \"label\": 1}\n");
  seed("data", "classification-3", std::string(1, '\x44') + "{\"prompt\": \"Is it?\", \"label\": 2}\n");
  seed("data", "pretokenized",
       std::string(1, '\x12') + "{\"input_ids\": [2, 10, 11, 12], \"labels\": [-100, 10, 11, 12]}\n"
                                "{\"input_ids\": [2, 259]}\r\n");
  seed("data", "plain", std::string(1, '\x05') + "Plain text, cut into windows of --seq-len tokens.\n</s>More.");

  // ---- state.json ----
  const nlohmann::ordered_json state = {
      {"format", "zo2-opt-checkpoint/1"}, {"noise_scheme", 2}, {"step", 40}, {"seed", 42},
      {"skipped_steps", 1}, {"updates", 39}, {"tokenizer", "bytes"},
      {"optimizer",
       {{"algorithm", "zo-adam"}, {"lr", 1e-3}, {"eps", 1e-3}, {"weight_decay", 0.0}, {"lr_schedule", "constant"},
        {"warmup_steps", 0}, {"estimator", "two-side"}, {"queries", 2}, {"accumulate", 1}, {"momentum", 0.9},
        {"beta1", 0.9}, {"beta2", 0.999}, {"adam_eps", 1e-8}}},
      {"train",
       {{"total_steps", 80}, {"batch", 4}, {"seq_len", 64}, {"demo", true}, {"data_kind", "demo"}, {"data", nullptr},
        {"template", "{prompt}"}, {"candidates", nullptr}, {"eval_data", nullptr}, {"eval_every", 0},
        {"eval_limit", 0}, {"checkpoint_every", 10}, {"checkpoint_dir", "/tmp/ckpt"},
        {"engine", {{"device", "cpu"}, {"offload", false}, {"codec", nullptr}, {"gpu_memory_budget_gib", nullptr},
                    {"description", "cpu"}}}}},
      {"model", tiny_config(false, true).to_json()}};
  seed("state", "full", state.dump(2));
  seed("state", "minimal", R"({"step": 3, "seed": 18446744073709551615})");
  seed("state", "float-step", R"({"step": 1e30, "seed": 1})");

  // ---- offload_state.safetensors / optimizer_state.safetensors ----
  {
    const zo2::offload::GroupCodec<zo2::offload::Int8RowCodec> codec(encoded_state_layout());
    std::vector<float> flat(encoded_state_layout().total_elements());
    for (std::size_t j = 0; j < flat.size(); ++j) flat[j] = static_cast<float>(j % 7) - 3.0f;
    std::vector<unsigned char> g0(codec.bytes()), g1(codec.bytes());
    codec.encode_group(flat, g0);
    flat[5] = 3.0e38f;
    codec.encode_group(flat, g1);
    seed("encoded_state", "int8",
         safetensors({{"group.0", Dtype::U8, {static_cast<std::int64_t>(g0.size())}, g0.data()},
                      {"group.1", Dtype::U8, {static_cast<std::int64_t>(g1.size())}, g1.data()}},
                     {{"codec", "int8"}, {"groups", "2"}}));
    const float state_values[4] = {0.5f, -0.25f, 1e-8f, 0.0f};
    seed("encoded_state", "rule-state",
         safetensors({{"group.0", Dtype::F32, {4}, state_values}, {"group.1", Dtype::F32, {0}, nullptr}},
                     {{"slots", "2"}, {"groups", "2"}}));
  }

  // ---- packed bf16 blocks (first byte: the layout, see fuzz_packed_bf16.cpp) ----
  for (const unsigned pick : {0u, 0x15u, 0x6eu}) {
    zo2::ParamLayout layout;
    static constexpr std::int64_t kSizes[] = {1, 31, 32, 33, 64, 100, 17, 96};
    const unsigned tensors = 1 + pick % 3;
    for (unsigned r = 0; r < tensors; ++r) {
      const std::int64_t n = kSizes[(pick >> (2 + 2 * r)) & 7];
      if (r == 1) layout.add("t" + std::to_string(r) + ".weight", {n / 8 + 1, 8});
      else layout.add("t" + std::to_string(r) + ".weight", {n});
    }
    const zo2::offload::PackedBf16Group codec(layout);
    std::vector<float> flat(layout.total_elements());
    for (std::size_t j = 0; j < flat.size(); ++j) flat[j] = (j % 5 == 0) ? 1e-30f * static_cast<float>(j) : 0.1f * static_cast<float>(j);
    std::vector<unsigned char> block(codec.bytes());
    codec.encode_group(flat, block);
    seed("packed_bf16", "layout-" + std::to_string(pick), std::string(1, static_cast<char>(pick)) +
                                                              std::string(block.begin(), block.end()));
  }
  std::printf("seeds written under %s\n", corpus.c_str());
  return 0;
}
