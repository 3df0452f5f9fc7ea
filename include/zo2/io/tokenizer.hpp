// zo2/io/tokenizer.hpp -- the tokenizer of a model directory, whatever its files:
// load_tokenizer(dir) reads tokenizer.json when the directory has one (LLaMA, Qwen, Mistral and
// most models today: zo2/io/tokenizer_json.hpp), else vocab.json + merges.txt (GPT-2/OPT
// byte-level BPE, read by BpeTokenizer exactly as before).
//
// The tokenizer.json reader needs PCRE2 and utf8proc. It is compiled in where
// ZO2_WITH_TOKENIZER_JSON is defined to 1, which linking CMake's zo2::tokenizers does (and
// which a program must then define in every file that includes this header, as the target
// does). Without it, load_tokenizer still reads vocab.json + merges.txt, also in a directory
// that has a tokenizer.json beside them; a directory with only a tokenizer.json is a FileError
// saying how to enable the reader. The two builds' types live in different inline namespaces,
// so mixing them in one program is a link error, never a silent ODR violation.
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/bpe_tokenizer.hpp>

#if defined(ZO2_WITH_TOKENIZER_JSON) && ZO2_WITH_TOKENIZER_JSON
#include <zo2/io/tokenizer_json.hpp>
#define ZO2_TOKENIZER_JSON_ENABLED 1
#define ZO2_TOKENIZER_ABI with_tokenizer_json
#else
#define ZO2_TOKENIZER_JSON_ENABLED 0
#define ZO2_TOKENIZER_ABI without_tokenizer_json
#endif

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace zo2::io {
inline namespace ZO2_TOKENIZER_ABI {

/// Whether this build reads tokenizer.json (ZO2_WITH_TOKENIZER_JSON, i.e. zo2::tokenizers).
inline constexpr bool kTokenizerJsonAvailable = ZO2_TOKENIZER_JSON_ENABLED != 0;

enum class TokenizerFormat {
  TokenizerJson,  // tokenizer.json (Hugging Face `tokenizers`)
  VocabMerges,    // vocab.json + merges.txt (GPT-2 byte-level BPE)
};

struct LoadTokenizerOptions {
  /// For vocab.json + merges.txt: the special tokens and bos BpeTokenizer uses (OPT's).
  BpeTokenizerOptions bpe = {};
  /// Where a directory has both tokenizer.json and vocab.json + merges.txt, read tokenizer.json
  /// (as transformers' fast tokenizers do). Ignored without the tokenizer.json reader.
  bool prefer_tokenizer_json = true;
};

/// A loaded tokenizer of either format. Copies share the loaded tables (read-only; encode and
/// decode may run on several threads).
class Tokenizer {
 public:
  /// Token ids of `text`. With add_special_tokens: tokenizer.json's post-processor template
  /// (e.g. "<s> $A"), or BpeTokenizer's bos (OPT's "</s>").
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = false) const {
#if ZO2_TOKENIZER_JSON_ENABLED
    if (json_) return json_->encode(text, add_special_tokens);
#endif
    return bpe_->encode(text, add_special_tokens);
  }

  /// The text of `ids`; with skip_special_tokens, special tokens are left out. An id outside
  /// the vocabulary is an Error.
  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens = false) const {
#if ZO2_TOKENIZER_JSON_ENABLED
    if (json_) return json_->decode(ids, skip_special_tokens);
#endif
    if (!skip_special_tokens) return bpe_->decode(ids);
    std::vector<std::int32_t> kept;
    kept.reserve(ids.size());
    for (const std::int32_t id : ids)
      if (!bpe_specials_.contains(id)) kept.push_back(id);
    return bpe_->decode(kept);
  }
  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens = false) const {
    return decode(std::span<const std::int32_t>(ids), skip_special_tokens);
  }

  /// The id encode(text, true) puts first, if any (tokenizer.json: the template's first special
  /// token; vocab.json + merges.txt: the bos token).
  std::optional<std::int32_t> bos_id() const {
#if ZO2_TOKENIZER_JSON_ENABLED
    if (json_) return json_->bos_id();
#endif
    return bpe_->token_to_id(bos_token_);
  }

  std::optional<std::int32_t> token_to_id(const std::string& token) const {
#if ZO2_TOKENIZER_JSON_ENABLED
    if (json_) return json_->token_to_id(token);
#endif
    return bpe_->token_to_id(token);
  }

  /// One more than the largest id.
  std::size_t vocab_size() const {
#if ZO2_TOKENIZER_JSON_ENABLED
    if (json_) return json_->vocab_size();
#endif
    return bpe_->vocab_size();
  }

  TokenizerFormat format() const noexcept {
    return bpe_ ? TokenizerFormat::VocabMerges : TokenizerFormat::TokenizerJson;
  }

  /// The directory it was loaded from.
  const std::filesystem::path& directory() const noexcept { return directory_; }

  /// E.g. "tokenizer.json, 151665 ids, from DIR".
  std::string description() const {
    const std::string files = bpe_ ? "vocab.json + merges.txt" : "tokenizer.json";
    return files + ", " + std::to_string(vocab_size()) + " ids, from " + directory_.string();
  }

  /// The underlying tokenizer of each format (null for the other).
  const BpeTokenizer* bpe() const noexcept { return bpe_.get(); }
#if ZO2_TOKENIZER_JSON_ENABLED
  const TokenizerJson* tokenizer_json() const noexcept { return json_.get(); }
#endif

 private:
  friend Tokenizer load_tokenizer(const std::filesystem::path& directory, LoadTokenizerOptions options);
  Tokenizer() = default;

  std::shared_ptr<const BpeTokenizer> bpe_;
  std::unordered_set<std::int32_t> bpe_specials_;
  std::string bos_token_;
#if ZO2_TOKENIZER_JSON_ENABLED
  std::shared_ptr<const TokenizerJson> json_;
#endif
  std::filesystem::path directory_;
};

/// The tokenizer in `directory`: tokenizer.json when it has one (and the reader is built in),
/// else vocab.json + merges.txt. A FileError names what is missing or malformed.
inline Tokenizer load_tokenizer(const std::filesystem::path& directory, LoadTokenizerOptions options = {}) {
  namespace fs = std::filesystem;
  const fs::path json_file = directory / "tokenizer.json";
  const fs::path vocab = directory / "vocab.json", merges = directory / "merges.txt";
  const bool has_json = fs::is_regular_file(json_file);
  const bool has_vocab = fs::is_regular_file(vocab), has_merges = fs::is_regular_file(merges);
  Tokenizer tokenizer;
  tokenizer.directory_ = directory;
#if ZO2_TOKENIZER_JSON_ENABLED
  if (has_json && (options.prefer_tokenizer_json || !has_vocab || !has_merges)) {
    tokenizer.json_ = std::make_shared<const TokenizerJson>(TokenizerJson::from_file(json_file));
    return tokenizer;
  }
#endif
  if (has_vocab && has_merges) {
    tokenizer.bpe_ = std::make_shared<const BpeTokenizer>(BpeTokenizer::from_files(vocab, merges, options.bpe));
    for (const std::string& token : options.bpe.special_tokens) {
      if (const auto id = tokenizer.bpe_->token_to_id(token)) tokenizer.bpe_specials_.insert(*id);
    }
    tokenizer.bos_token_ = options.bpe.bos_token;
    return tokenizer;
  }
  if (has_json) {
    throw FileError(json_file.string(),
                    "this build of zo2 has no tokenizer.json reader: it needs PCRE2 and utf8proc "
                    "(Debian: apt-get install libpcre2-dev libutf8proc-dev; CMake: link zo2::tokenizers, "
                    "which defines ZO2_WITH_TOKENIZER_JSON=1)");
  }
  if (has_vocab != has_merges) {
    throw FileError((has_vocab ? merges : vocab).string(),
                    "missing (a GPT-2 style tokenizer needs vocab.json and merges.txt; or give a tokenizer.json)");
  }
  throw FileError(directory.string(), "no tokenizer.json, nor vocab.json + merges.txt");
}

}  // inline namespace ZO2_TOKENIZER_ABI
}  // namespace zo2::io
