#include "tokenizer.hpp"

#include <array>
#include <fstream>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>
#include <zo2/io/tokenizer.hpp>

#include "fs_util.hpp"

namespace zo2_opt {

namespace {
constexpr std::array<const char*, 4> kByteSpecials = {"<s>", "<pad>", "</s>", "<unk>"};

std::string utf8(char32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    s.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    s.push_back(static_cast<char>(0xe0 | (cp >> 12)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
  return s;
}
}  // namespace

struct Tokenizer::Loaded {
  zo2::io::Tokenizer tokenizer;
};

Tokenizer Tokenizer::bytes() { return Tokenizer{}; }

bool Tokenizer::present_in(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  return fs::is_regular_file(dir / "tokenizer.json") ||
         (fs::is_regular_file(dir / "vocab.json") && fs::is_regular_file(dir / "merges.txt"));
}

Tokenizer Tokenizer::from_directory(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw zo2::FileError(dir.string(), "no such tokenizer directory");
  if (!present_in(dir)) {
    const bool vocab = fs::exists(dir / "vocab.json");
    if (vocab != fs::exists(dir / "merges.txt"))
      throw zo2::FileError((dir / (vocab ? "merges.txt" : "vocab.json")).string(),
                           "missing (the tokenizer needs tokenizer.json, or vocab.json and merges.txt)");
    throw zo2::FileError((dir / "tokenizer.json").string(),
                         "missing (the tokenizer needs tokenizer.json, or vocab.json and merges.txt)");
  }
  Tokenizer t;
  t.loaded_ = std::make_shared<const Loaded>(Loaded{zo2::io::load_tokenizer(dir)});
  t.source_dir_ = dir;
  return t;
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  if (loaded_) return loaded_->tokenizer.encode(text, add_special);
  std::vector<std::int32_t> ids;
  ids.reserve(text.size() + 1);
  if (add_special) ids.push_back(2);
  for (std::size_t i = 0; i < text.size();) {
    bool special = false;
    if (text[i] == '<')
      for (std::size_t s = 0; s < kByteSpecials.size(); ++s) {
        const std::string_view tok = kByteSpecials[s];
        if (text.substr(i, tok.size()) == tok) {
          ids.push_back(static_cast<std::int32_t>(s));
          i += tok.size();
          special = true;
          break;
        }
      }
    if (special) continue;
    ids.push_back(4 + static_cast<std::int32_t>(static_cast<unsigned char>(text[i])));
    ++i;
  }
  return ids;
}

std::string Tokenizer::decode(std::span<const std::int32_t> ids) const {
  if (loaded_) return loaded_->tokenizer.decode(ids);
  std::string text;
  for (const std::int32_t id : ids) {
    if (id < 0 || id >= kByteVocabSize) throw zo2::Error("token id " + std::to_string(id) + " is not in the byte vocabulary");
    if (id < 4) text += kByteSpecials[static_cast<std::size_t>(id)];
    else text.push_back(static_cast<char>(id - 4));
  }
  return text;
}

std::optional<std::int32_t> Tokenizer::bos_id() const {
  if (loaded_) return loaded_->tokenizer.bos_id();
  return 2;
}

std::size_t Tokenizer::vocab_size() const { return loaded_ ? loaded_->tokenizer.vocab_size() : kByteVocabSize; }

std::string Tokenizer::kind() const {
  if (!loaded_) return "bytes";
  return loaded_->tokenizer.format() == zo2::io::TokenizerFormat::TokenizerJson ? "tokenizer.json" : "bpe";
}

std::string Tokenizer::description() const {
  if (!loaded_) return "built-in byte vocabulary (260 tokens)";
  if (loaded_->tokenizer.format() == zo2::io::TokenizerFormat::TokenizerJson)
    return "tokenizer.json (" + std::to_string(vocab_size()) + " tokens) from " + source_dir_.string();
  return "BPE (" + std::to_string(vocab_size()) + " tokens) from " + source_dir_.string();
}

void Tokenizer::save(const std::filesystem::path& dir) const {
  if (loaded_) {
    for (const char* name : {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                             "special_tokens_map.json", "added_tokens.json", "generation_config.json"}) {
      const auto src = source_dir_ / name;
      if (std::filesystem::exists(src)) {
        std::error_code ec;
        if (std::filesystem::equivalent(src, dir / name, ec)) continue;
        write_file_synced(dir / name, read_file(src));
      }
    }
    return;
  }
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  for (std::size_t s = 0; s < kByteSpecials.size(); ++s) vocab[kByteSpecials[s]] = s;
  const auto& table = zo2::io::bpe_detail::byte_to_code_point();
  for (unsigned b = 0; b < 256; ++b) vocab[utf8(table[b])] = 4 + b;
  write_file_synced(dir / "vocab.json", vocab.dump() + "\n");
  write_file_synced(dir / "merges.txt", "#version: 0.2\n");
  const nlohmann::ordered_json config = {
      {"tokenizer_class", "GPT2Tokenizer"}, {"add_prefix_space", false}, {"bos_token", "</s>"},
      {"eos_token", "</s>"}, {"pad_token", "<pad>"}, {"unk_token", "<unk>"}, {"add_bos_token", true},
      {"model_max_length", 1000000}};
  write_file_synced(dir / "tokenizer_config.json", config.dump(2) + "\n");
}

}  // namespace zo2_opt
