// zo2/io/tokenizer_json/engines.hpp -- the maintained libraries behind tokenizer_json.hpp:
// Unicode normalization (NFC/NFD/NFKC/NFKD) by utf8proc, as tokenizers' older tables
// normalize (normalization_barriers.hpp), and the tokenizer's regexes on PCRE2
// (8-bit, UTF + UCP, JIT where available), translated from Oniguruma's reading where the two
// engines differ (see tokenizer_json.hpp).
#pragma once

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/io/tokenizer_json/normalization_barriers.hpp>
#include <zo2/io/tokenizer_json/utf8.hpp>

namespace zo2::io::tokenizer_json_detail {

// ---- Unicode normalization (utf8proc) ---------------------------------------------------------

enum class NormalForm { NFC, NFD, NFKC, NFKD };

/// utf8proc's normal form of the whole text.
inline std::string utf8proc_normalize(std::string_view valid_utf8, NormalForm form) {
  int options = UTF8PROC_STABLE;
  switch (form) {
    case NormalForm::NFC: options |= UTF8PROC_COMPOSE; break;
    case NormalForm::NFD: options |= UTF8PROC_DECOMPOSE; break;
    case NormalForm::NFKC: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case NormalForm::NFKD: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
  }
  utf8proc_uint8_t* mapped = nullptr;
  const utf8proc_ssize_t length =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(valid_utf8.data()),
                   static_cast<utf8proc_ssize_t>(valid_utf8.size()), &mapped, static_cast<utf8proc_option_t>(options));
  if (length < 0) {
    std::free(mapped);
    throw Error(std::string("tokenizer.json: Unicode normalization failed: ") + utf8proc_errmsg(length));
  }
  std::string out(reinterpret_cast<const char*>(mapped), static_cast<std::size_t>(length));
  std::free(mapped);
  return out;
}

/// The normal form tokenizers computes: utf8proc's, of each piece between the characters its
/// older tables leave alone (normalization_barriers.hpp), which stay as they are.
inline std::string unicode_normalize(std::string_view valid_utf8, NormalForm form) {
  if (std::all_of(valid_utf8.begin(), valid_utf8.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; })) {
    return std::string(valid_utf8);  // ASCII is in every normal form
  }
  std::string out;
  std::size_t piece = 0;  // where the piece not yet normalized starts
  for (std::size_t i = 0, length = 0; i < valid_utf8.size(); i += length) {
    if (!is_normalization_barrier(code_point_at(valid_utf8, i, length))) continue;
    if (i > piece) out += utf8proc_normalize(valid_utf8.substr(piece, i - piece), form);
    out.append(valid_utf8.substr(i, length));
    piece = i + length;
  }
  if (piece == 0) return utf8proc_normalize(valid_utf8, form);
  if (piece < valid_utf8.size()) out += utf8proc_normalize(valid_utf8.substr(piece), form);
  return out;
}

// ---- Regular expressions (PCRE2) --------------------------------------------------------------

/// Rewrites an Oniguruma pattern (what tokenizers compiles) for PCRE2 where the two read an
/// escape differently. Everything else (\p{..}, (?i:..), lookarounds, {m,n}) means the same.
inline std::string oniguruma_to_pcre2(std::string_view pattern) {
  static constexpr std::string_view kWord = "\\p{Alphabetic}\\p{M}\\p{N}\\p{Pc}";
  std::string out;
  out.reserve(pattern.size() + 16);
  int class_depth = 0;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      const bool in_class = class_depth > 0;
      switch (e) {
        case 's': out += "\\p{White_Space}"; break;
        case 'S': out += "\\P{White_Space}"; break;
        case 'w': out += in_class ? std::string(kWord) : "[" + std::string(kWord) + "]"; break;
        case 'W':
          // Inside a class a negated class cannot be spelled; PCRE2's own \W is close.
          out += in_class ? std::string("\\W") : "[^" + std::string(kWord) + "]";
          break;
        case 'u':  // \uHHHH (Oniguruma's Ruby syntax) is PCRE2's \x{HHHH}
          if (i + 4 < pattern.size() &&
              std::all_of(pattern.begin() + static_cast<std::ptrdiff_t>(i) + 1, pattern.begin() + static_cast<std::ptrdiff_t>(i) + 5,
                          [](char h) { return std::isxdigit(static_cast<unsigned char>(h)) != 0; })) {
            out += "\\x{" + std::string(pattern.substr(i + 1, 4)) + "}";
            i += 4;
          } else {
            out += "\\u";
          }
          break;
        case 'h': out += in_class ? "0-9a-fA-F" : "[0-9a-fA-F]"; break;
        case 'H': out += in_class ? "\\x00-/:-@G-`g-\\x{10FFFF}" : "[^0-9a-fA-F]"; break;
        default:
          out += '\\';
          out += e;
      }
      continue;
    }
    if (c == '[') {
      ++class_depth;
      out += c;
      // A ']' right after '[' or '[^' is a literal in both engines.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (c == ']' && class_depth > 0) --class_depth;
    out += c;
  }
  return out;
}

/// A compiled pattern; matches give byte offsets. Shared between copies, read-only after
/// compilation (PCRE2 code may be used from several threads at once).
class Regex {
 public:
  Regex() = default;

  /// Compiles an Oniguruma pattern; throws zo2::Error with PCRE2's message and the offset.
  explicit Regex(std::string_view oniguruma_pattern) {
    const std::string translated = oniguruma_to_pcre2(oniguruma_pattern);
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    pcre2_code_8* code = pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(translated.data()), translated.size(),
                                         PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR8 message[256];
      pcre2_get_error_message_8(error_code, message, sizeof message);
      throw Error("regex /" + std::string(oniguruma_pattern) + "/ does not compile (PCRE2, as /" + translated +
                  "/, at offset " + std::to_string(error_offset) + "): " + reinterpret_cast<const char*>(message));
    }
    code_ = std::shared_ptr<pcre2_code_8>(code, [](pcre2_code_8* c) { pcre2_code_free_8(c); });
    // JIT where PCRE2 was built with it; otherwise (or if it fails) the interpreter runs.
    pcre2_jit_compile_8(code, PCRE2_JIT_COMPLETE);
  }

  explicit operator bool() const noexcept { return static_cast<bool>(code_); }

  /// The matches tokenizers' find_iter (Oniguruma through the onig crate) reports over valid
  /// UTF-8: leftmost, non-overlapping; an empty match right after the previous match is
  /// skipped by moving one character on.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::string_view text) const {
    std::vector<std::pair<std::size_t, std::size_t>> matches;
    const std::unique_ptr<pcre2_match_data_8, void (*)(pcre2_match_data_8*)> data(
        pcre2_match_data_create_from_pattern_8(code_.get(), nullptr), &pcre2_match_data_free_8);
    if (!data) throw std::bad_alloc();
    std::size_t position = 0;
    std::optional<std::size_t> last_match_end;
    while (position <= text.size()) {
      int rc = pcre2_match_8(code_.get(), reinterpret_cast<PCRE2_SPTR8>(text.data()), text.size(), position,
                             PCRE2_NO_UTF_CHECK, data.get(), nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        rc = pcre2_match_8(code_.get(), reinterpret_cast<PCRE2_SPTR8>(text.data()), text.size(), position,
                           PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, data.get(), nullptr);
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR8 message[256];
        pcre2_get_error_message_8(rc, message, sizeof message);
        throw Error(std::string("tokenizer.json: regex match failed: ") + reinterpret_cast<const char*>(message));
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer_8(data.get());
      const std::size_t start = ovector[0], end = ovector[1];
      if (start == end && last_match_end == end) {
        if (position >= text.size()) break;
        position += char_length(static_cast<unsigned char>(text[position]));
        continue;
      }
      matches.emplace_back(start, end);
      last_match_end = end;
      position = end;
    }
    return matches;
  }

 private:
  std::shared_ptr<pcre2_code_8> code_;
};

}  // namespace zo2::io::tokenizer_json_detail
