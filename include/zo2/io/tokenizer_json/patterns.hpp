// zo2/io/tokenizer_json/patterns.hpp -- what a Split or Replace step matches and how a match
// divides the text (tokenizers' tokenizer/pattern.rs, normalizer.rs), and the byte-level
// alphabet (part of tokenizer_json.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <zo2/io/bpe_tokenizer.hpp>  // bpe_detail::byte_to_code_point
#include <zo2/io/tokenizer_json/engines.hpp>
#include <zo2/io/tokenizer_json/utf8.hpp>

namespace zo2::io::tokenizer_json_detail {

// ---- Patterns and split behaviours (tokenizer/pattern.rs, normalizer.rs) ----------------------

struct Span {
  std::size_t start, end;
  bool is_match;
};

/// A Split/Replace pattern: a literal string ({"String": ...}) or a regex ({"Regex": ...}).
struct Pattern {
  bool is_regex = false;
  std::string literal;
  Regex regex;

  /// Covers `text` with contiguous spans, each marked as a match or not (Pattern::find_matches).
  std::vector<Span> find_matches(std::string_view text) const {
    if (text.empty()) return {{0, 0, false}};
    std::vector<Span> spans;
    std::size_t previous = 0;
    const auto add = [&](std::size_t start, std::size_t end) {
      if (previous != start) spans.push_back({previous, start, false});
      spans.push_back({start, end, true});
      previous = end;
    };
    if (is_regex) {
      for (const auto& [start, end] : regex.find_all(text)) add(start, end);
    } else if (!literal.empty()) {
      for (std::size_t at = text.find(literal); at != std::string_view::npos; at = text.find(literal, at + literal.size())) {
        add(at, at + literal.size());
      }
    }
    if (previous != text.size()) spans.push_back({previous, text.size(), false});
    return spans;
  }
};

/// Each character for which `predicate` holds is a match of its own (Pattern for Fn(char)).
template <class Predicate>
std::vector<Span> find_char_matches(std::string_view text, Predicate predicate) {
  if (text.empty()) return {{0, 0, false}};
  std::vector<Span> spans;
  std::size_t last = 0, length = 0;
  for (std::size_t i = 0; i < text.size(); i += length) {
    const char32_t cp = code_point_at(text, i, length);
    if (predicate(cp)) {
      if (last < i) spans.push_back({last, i, false});
      spans.push_back({i, i + length, true});
      last = i + length;
    }
  }
  if (text.size() > last) spans.push_back({last, text.size(), false});
  return spans;
}

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

/// The ranges NormalizedString::split keeps for a behaviour (empty ones are dropped later).
inline std::vector<std::pair<std::size_t, std::size_t>> apply_behavior(const std::vector<Span>& spans, SplitBehavior behavior) {
  std::vector<std::pair<std::size_t, std::size_t>> kept;
  kept.reserve(spans.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::Isolated:
      for (const Span& s : spans) kept.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::Removed:
      for (const Span& s : spans)
        if (!s.is_match) kept.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::Contiguous:
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !kept.empty()) {
          kept.back().second = s.end;
        } else {
          kept.emplace_back(s.start, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::MergedWithPrevious:
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !kept.empty()) {
          kept.back().second = s.end;
        } else {
          kept.emplace_back(s.start, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::MergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !kept.empty()) {
          kept.back().first = it->start;
        } else {
          kept.emplace_back(it->start, it->end);
        }
        previous_match = it->is_match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  return kept;
}

/// Replaces every match of `pattern` in `text` with `content` (NormalizedString::replace and
/// the Replace decoder).
inline std::string replace_all(const Pattern& pattern, std::string_view text, std::string_view content) {
  std::string out;
  out.reserve(text.size());
  for (const Span& s : pattern.find_matches(text)) {
    if (s.is_match) {
      out += content;
    } else {
      out.append(text.substr(s.start, s.end - s.start));
    }
  }
  return out;
}

/// GPT-2's byte-to-character table as a string per byte, and its inverse.
inline const std::array<std::string, 256>& byte_level_chars() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    for (unsigned b = 0; b < 256; ++b) t[b] = utf8_of(bpe_detail::byte_to_code_point()[b]);
    return t;
  }();
  return table;
}

inline std::string to_byte_level(std::string_view text) {
  std::string out;
  out.reserve(text.size() * 2);
  for (const char c : text) out += byte_level_chars()[static_cast<unsigned char>(c)];
  return out;
}

/// The byte a byte-level character stands for, or -1.
inline int byte_of_byte_level_char(char32_t cp) {
  static const std::vector<std::int16_t> table = [] {
    std::vector<std::int16_t> t(512, -1);
    for (unsigned b = 0; b < 256; ++b) t[bpe_detail::byte_to_code_point()[b]] = static_cast<std::int16_t>(b);
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}

}  // namespace zo2::io::tokenizer_json_detail
