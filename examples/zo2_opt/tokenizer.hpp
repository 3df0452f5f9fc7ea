// zo2-opt: the tokenizer a run uses: GPT-2 byte-level BPE from a model directory
// (vocab.json + merges.txt), or the built-in byte vocabulary of the demo (OPT's four special
// tokens, then one id per byte), which needs no files and is itself a valid byte-level BPE
// with no merges: save() writes it as vocab.json + merges.txt that transformers can load.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <zo2/io/bpe_tokenizer.hpp>

namespace zo2_opt {

class Tokenizer {
 public:
  /// <s>=0, <pad>=1, </s>=2, <unk>=3 (OPT's ids), byte b = 4 + b.
  static constexpr std::int32_t kByteVocabSize = 260;
  static Tokenizer bytes();
  /// vocab.json + merges.txt in `dir`; a missing file is an error that names it.
  static Tokenizer from_directory(const std::filesystem::path& dir);
  /// Whether `dir` holds vocab.json and merges.txt.
  static bool present_in(const std::filesystem::path& dir);

  std::vector<std::int32_t> encode(std::string_view text, bool add_bos) const;
  std::string decode(std::span<const std::int32_t> ids) const;
  std::int32_t bos_id() const;
  std::size_t vocab_size() const;
  bool is_bytes() const { return !bpe_; }
  std::string description() const;
  /// Writes the tokenizer files into `dir`: the byte vocabulary as vocab.json + merges.txt,
  /// or copies of the source directory's tokenizer files.
  void save(const std::filesystem::path& dir) const;

 private:
  std::shared_ptr<const zo2::io::BpeTokenizer> bpe_;
  std::filesystem::path source_dir_;
};

}  // namespace zo2_opt
