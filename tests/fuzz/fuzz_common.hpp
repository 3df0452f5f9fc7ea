// Shared by the libFuzzer harnesses of tests/fuzz/: a per-process scratch directory the
// parsers read their files from (they take paths, not buffers), the split of one fuzz input into
// several files, and the checks a harness makes of a parser's result.
//
// A harness lets a parser refuse its input with zo2::Error (FileError, ConfigError, ...), the
// exceptions whose one-line message zo2-opt prints; anything else escaping it (std::bad_alloc,
// a raw nlohmann or std:: exception), a sanitizer report, a timeout or a failed ZO2_FUZZ_CHECK
// is a finding. The same sources build with a plain main (fuzz_driver.cpp) that replays a
// corpus, so the committed corpus runs in every build of the test suite too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <unistd.h>

#include <zo2/core/error.hpp>

/// A property the harness checks of an accepted input; failing it aborts (a finding).
#define ZO2_FUZZ_CHECK(cond)                                                                   \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "ZO2_FUZZ_CHECK failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)

namespace zo2_fuzz {

/// Separates the files of a multi-file input (config.json + model.safetensors, vocab.json +
/// merges.txt + text, ...). tests/fuzz/zo2.dict lists it, so mutations keep the parts apart.
inline constexpr std::string_view kPartSeparator = "\n--zo2-part--\n";

/// The input cut at each separator into at most `max_parts` parts (the last keeps the rest).
inline std::vector<std::string_view> split_parts(const std::uint8_t* data, std::size_t size, std::size_t max_parts) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < max_parts) {
    const std::size_t at = rest.find(kPartSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(rest.substr(0, at));
    rest.remove_prefix(at + kPartSeparator.size());
  }
  parts.push_back(rest);
  return parts;
}

/// This process's scratch directory under $TMPDIR (or /tmp), removed at exit. Created once.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/zo2-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror("zo2 fuzz: mkdtemp");
      std::abort();
    }
    static const std::filesystem::path made(pattern);
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(made, ignored);
    });
    return made;
  }();
  return dir;
}

/// Empties the scratch directory (files of the previous input must not leak into this one).
inline void clear_scratch() {
  std::error_code ignored;
  for (const auto& entry : std::filesystem::directory_iterator(scratch_dir(), ignored))
    std::filesystem::remove_all(entry.path(), ignored);
}

/// Writes `bytes` to scratch_dir()/name and returns the path.
inline std::filesystem::path write_scratch(const std::string& name, std::string_view bytes) {
  const std::filesystem::path path = scratch_dir() / name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "zo2 fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
  return path;
}

/// A message zo2 shows the user must be one line (zo2-opt prints e.what() after "zo2-opt: ")
/// that is not empty.
inline void check_message(const zo2::Error& e) {
  const std::string_view what = e.what();
  ZO2_FUZZ_CHECK(!what.empty());
}

}  // namespace zo2_fuzz
