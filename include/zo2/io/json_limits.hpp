// zo2/io/json_limits.hpp -- the nesting depth of untrusted JSON. nlohmann::json parses and
// destroys any depth without recursion, but copying, comparing or dump()ing a value recurses
// once per level: a few MB of "[[[[...]]]]" where zo2 copies a section or shows a bad value in
// an error message overflow the stack (a segfault, not an error naming the file). No file zo2
// reads nests deeper than a few levels, so every reader checks the text before parsing it.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <zo2/core/error.hpp>

namespace zo2::io {

/// The deepest nesting of arrays and objects zo2 reads from a file.
inline constexpr std::size_t kMaxJsonDepth = 64;

/// The deepest nesting of arrays and objects in JSON `text`, counted up to limit + 1 (strings
/// are skipped, escapes included; the text need not be valid JSON). Linear, no allocation.
inline std::size_t json_nesting_depth(std::string_view text, std::size_t limit = kMaxJsonDepth) {
  std::size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest && (deepest = depth) > limit) return deepest;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

/// The message of a refusal, for readers that name their own origin.
inline std::string json_depth_message(std::size_t limit = kMaxJsonDepth) {
  return "JSON nested more than " + std::to_string(limit) + " levels deep";
}

/// Throws FileError naming `source` when `text` nests deeper than `limit`.
inline void check_json_depth(std::string_view text, const std::string& source, std::size_t limit = kMaxJsonDepth) {
  if (json_nesting_depth(text, limit) > limit) throw FileError(source, json_depth_message(limit));
}

}  // namespace zo2::io
