// zo2/io/tokenizer_json/utf8.hpp -- UTF-8 as tokenizers sees it (part of tokenizer_json.hpp):
// well-formedness by Unicode's Table 3-7, invalid text made valid as Rust's
// String::from_utf8_lossy does, code points in and out, and Rust's \w and is_numeric classes.
#pragma once

#include <utf8proc.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <zo2/io/unicode.hpp>

namespace zo2::io::tokenizer_json_detail {

// ---- UTF-8 ------------------------------------------------------------------------------------

/// The length of the well-formed UTF-8 sequence at text[i] (Unicode's Table 3-7), or 0 when
/// there is none; then `bad` is the length of the maximal subpart that one U+FFFD replaces.
inline std::size_t well_formed_at(std::string_view text, std::size_t i, std::size_t& bad) noexcept {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char lead = byte(i);
  if (lead < 0x80) return 1;
  std::size_t need = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the second byte's range
  if (lead >= 0xc2 && lead <= 0xdf) {
    need = 2;
  } else if (lead == 0xe0) {
    need = 3, lo = 0xa0;
  } else if ((lead >= 0xe1 && lead <= 0xec) || lead == 0xee || lead == 0xef) {
    need = 3;
  } else if (lead == 0xed) {
    need = 3, hi = 0x9f;
  } else if (lead == 0xf0) {
    need = 4, lo = 0x90;
  } else if (lead >= 0xf1 && lead <= 0xf3) {
    need = 4;
  } else if (lead == 0xf4) {
    need = 4, hi = 0x8f;
  } else {
    bad = 1;
    return 0;
  }
  std::size_t k = 1;
  for (; k < need && i + k < text.size(); ++k) {
    const unsigned char c = byte(i + k);
    if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xbf)) break;
  }
  if (k == need) return need;
  bad = k;
  return 0;
}

inline bool is_valid_utf8(std::string_view text) noexcept {
  for (std::size_t i = 0; i < text.size();) {
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    std::size_t bad = 0;
    const std::size_t n = well_formed_at(text, i, bad);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

/// Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes one U+FFFD.
inline std::string to_valid_utf8(std::string_view text) {
  if (is_valid_utf8(text)) return std::string(text);
  std::string out;
  out.reserve(text.size() + 8);
  for (std::size_t i = 0; i < text.size();) {
    std::size_t bad = 0;
    const std::size_t n = well_formed_at(text, i, bad);
    if (n != 0) {
      out.append(text.substr(i, n));
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return out;
}

/// Bytes of the character starting with `lead` (valid UTF-8 assumed).
constexpr std::size_t char_length(unsigned char lead) noexcept {
  return lead < 0x80 ? 1 : lead < 0xe0 ? 2 : lead < 0xf0 ? 3 : 4;
}

/// The code point at text[i] of valid UTF-8, and its length.
inline char32_t code_point_at(std::string_view text, std::size_t i, std::size_t& length) noexcept {
  const auto byte = [&](std::size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(text[k])); };
  const char32_t lead = byte(i);
  length = char_length(static_cast<unsigned char>(lead));
  switch (length) {
    case 1: return lead;
    case 2: return ((lead & 0x1f) << 6) | (byte(i + 1) & 0x3f);
    case 3: return ((lead & 0x0f) << 12) | ((byte(i + 1) & 0x3f) << 6) | (byte(i + 2) & 0x3f);
    default:
      return ((lead & 0x07) << 18) | ((byte(i + 1) & 0x3f) << 12) | ((byte(i + 2) & 0x3f) << 6) | (byte(i + 3) & 0x3f);
  }
}

inline std::vector<char32_t> code_points(std::string_view text) {
  std::vector<char32_t> out;
  out.reserve(text.size());
  for (std::size_t i = 0, n = 0; i < text.size(); i += n) out.push_back(code_point_at(text, i, n));
  return out;
}

inline std::string utf8_of(char32_t cp) {
  std::string s;
  unicode::append_utf8(s, cp);
  return s;
}

/// Rust's regex \w (Unicode word character), for added tokens' single_word: letters, marks,
/// decimal and letter numbers, connector punctuation, ZWNJ/ZWJ. (Rust's also counts
/// Other_Alphabetic symbols such as Ⓐ, which utf8proc does not expose.)
inline bool is_word_char(char32_t cp) noexcept {
  if (cp == 0x200c || cp == 0x200d) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

/// Rust's char::is_numeric: general category Nd, Nl or No.
inline bool is_numeric_char(char32_t cp) noexcept {
  const auto category = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return category == UTF8PROC_CATEGORY_ND || category == UTF8PROC_CATEGORY_NL || category == UTF8PROC_CATEGORY_NO;
}

}  // namespace zo2::io::tokenizer_json_detail
