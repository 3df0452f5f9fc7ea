// zo2-opt: the tokenizer a run uses: the one of a model directory, read by zo2::io::load_tokenizer
// (tokenizer.json when the directory has one: LLaMA, Qwen, Mistral; else GPT-2 byte-level BPE
// from vocab.json + merges.txt: OPT), or the built-in byte vocabulary of the demo (OPT's four
// special tokens, then one id per byte), which needs no files and is itself a valid byte-level
// BPE with no merges: save() writes it as vocab.json + merges.txt that transformers can load.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace zo2_opt {

class Tokenizer {
 public:
  /// <s>=0, <pad>=1, </s>=2, <unk>=3 (OPT's ids), byte b = 4 + b.
  static constexpr std::int32_t kByteVocabSize = 260;
  static Tokenizer bytes();
  /// The tokenizer in `dir`: tokenizer.json when present, else vocab.json + merges.txt; a
  /// directory with neither (or a tokenizer.json in a build without its reader) is an error
  /// that names the file.
  static Tokenizer from_directory(const std::filesystem::path& dir);
  /// Whether `dir` holds tokenizer.json, or vocab.json and merges.txt.
  static bool present_in(const std::filesystem::path& dir);

  /// With add_special: the tokenizer's own special tokens (tokenizer.json's post-processor,
  /// e.g. "<s> $A"; OPT's leading </s>; Qwen's: none).
  std::vector<std::int32_t> encode(std::string_view text, bool add_special) const;
  /// The text of a whole sequence (decode sequences, not tokens one by one: a token may hold
  /// part of a UTF-8 character, and SentencePiece decoders treat the first token specially).
  std::string decode(std::span<const std::int32_t> ids) const;
  /// The id encode(text, true) starts with, if any (Qwen's tokenizers have none).
  std::optional<std::int32_t> bos_id() const;
  std::size_t vocab_size() const;
  bool is_bytes() const { return !loaded_; }
  /// "bytes", "bpe" (vocab.json + merges.txt) or "tokenizer.json": what state.json records.
  std::string kind() const;
  std::string description() const;
  /// Writes the tokenizer files into `dir`: the byte vocabulary as vocab.json + merges.txt,
  /// or copies of the source directory's tokenizer files (tokenizer.json, vocab.json,
  /// merges.txt, tokenizer_config.json, special_tokens_map.json, ... as it has them).
  void save(const std::filesystem::path& dir) const;

 private:
  struct Loaded;  // a zo2::io::Tokenizer (tokenizer.cpp), so this header stays light
  std::shared_ptr<const Loaded> loaded_;
  std::filesystem::path source_dir_;
};

}  // namespace zo2_opt
