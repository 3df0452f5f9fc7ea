// zo2/io/json_file.hpp -- reading a JSON file zo2 does not trust (config.json and the like), and
// naming a bad value in an error message without recursing into it.
//
// A value's dump() recurses once per nesting level (json_limits.hpp): a config field holding
// "[[[[...]]]]" would overflow the stack in the message meant to refuse it. read_json_file
// checks the nesting before parsing; json_brief describes a value for a message in constant
// stack, whatever a caller's parsed JSON holds.
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>
#include <zo2/io/json_limits.hpp>

namespace zo2::io {

/// The parsed contents of the JSON file at `path`. FileError naming the file when it is missing
/// or cannot be read, nests deeper than kMaxJsonDepth, or is not valid JSON.
inline nlohmann::json read_json_file(const std::filesystem::path& path) {
  const std::string file = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(file, std::filesystem::exists(path) ? "cannot open" : "no such file");
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) throw FileError(file, "read failed");
  const std::string text = content.str();
  check_json_depth(text, file);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(file, std::string("not valid JSON: ") + e.what());
  }
}

/// A value as an error message shows it: scalars as JSON (a string cut to 80 characters), an
/// array or an object by its kind and size only (no recursion into it).
inline std::string json_brief(const nlohmann::json& v) {
  if (v.is_array()) return "an array of " + std::to_string(v.size()) + (v.size() == 1 ? " element" : " elements");
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + (v.size() == 1 ? " key" : " keys");
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    if (s.size() > 80) return nlohmann::json(s.substr(0, 80)).dump() + "...";
  }
  return v.dump();
}

}  // namespace zo2::io
