// zo2/io/tokenizer_json/pipeline.hpp -- the steps a tokenizer.json describes (normalizers,
// pre-tokenizers, decoders), the pieces text is split into, added tokens and their matcher, and
// the post-processor's template items (part of tokenizer_json.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <zo2/io/tokenizer_json/engines.hpp>
#include <zo2/io/tokenizer_json/patterns.hpp>
#include <zo2/io/tokenizer_json/utf8.hpp>

namespace zo2::io::tokenizer_json_detail {

// ---- Pipeline steps ---------------------------------------------------------------------------

struct NormalizerStep {
  enum class Kind { Unicode, Prepend, Replace, Strip, ByteLevel } kind;
  NormalForm form = NormalForm::NFC;
  std::string text;  // Prepend: what; Replace: content
  Pattern pattern;   // Replace
  bool strip_left = false, strip_right = false;
};

enum class PrependScheme { First, Never, Always };

struct PreTokenizerStep {
  enum class Kind { Split, ByteLevel, Metaspace, Digits, WhitespaceSplit } kind;
  Pattern pattern;  // Split
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false, use_regex = true;  // ByteLevel
  std::string replacement;                          // Metaspace (one character)
  PrependScheme prepend_scheme = PrependScheme::Always;
  bool split = true;
  bool individual_digits = false;  // Digits
};

struct DecoderStep {
  enum class Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  Pattern pattern;  // Replace
  std::string content;
  char32_t strip_char = U' ';
  std::size_t strip_start = 0, strip_stop = 0;
  char32_t replacement = 0x2581;  // Metaspace
  PrependScheme prepend_scheme = PrependScheme::Always;
};

/// One piece of text on its way through the pipeline; `id` >= 0 once it is an added token.
struct Piece {
  std::string text;
  std::int32_t id = -1;
  bool at_start = false;  // begins at byte 0 of the input (Metaspace's prepend_scheme "first")
};

struct AddedToken {
  std::string content;
  std::int32_t id = -1;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
  std::string match_form;   // what is looked for: content, or its normalized form
  std::string decode_form;  // what decode() hands the decoder (tokenizers' simple_id_to_token)
};

/// The added tokens of one kind (raw or normalized), found leftmost-longest as tokenizers'
/// Aho-Corasick automaton (MatchKind::LeftmostLongest) finds them.
class AddedTokenMatcher {
 public:
  void add(const std::string& pattern, std::size_t token_index) {
    if (pattern.empty()) return;
    auto& list = by_first_byte_[static_cast<unsigned char>(pattern[0])];
    for (const auto& [existing, index] : list)
      if (existing == pattern) return;  // the first token with this pattern keeps it
    list.emplace_back(pattern, token_index);
    std::stable_sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    empty_ = false;
  }
  bool empty() const noexcept { return empty_; }

  struct Match {
    std::size_t start, end, token_index;
  };
  /// The leftmost match at or after `from` (the longest of those starting there).
  std::optional<Match> next(std::string_view text, std::size_t from) const {
    for (std::size_t i = from; i < text.size(); ++i) {
      for (const auto& [pattern, index] : by_first_byte_[static_cast<unsigned char>(text[i])]) {
        if (text.compare(i, pattern.size(), pattern) == 0) return Match{i, i + pattern.size(), index};
      }
    }
    return std::nullopt;
  }

 private:
  std::array<std::vector<std::pair<std::string, std::size_t>>, 256> by_first_byte_;
  bool empty_ = true;
};

struct TemplateItem {
  bool is_sequence = false;         // $A
  std::vector<std::int32_t> ids;    // a special token's ids
};

}  // namespace zo2::io::tokenizer_json_detail
