// zo2/core/error.hpp -- the library's exception types.
//
// Every failure a user can cause (bad config, bad file, bad data) becomes an exception whose
// message names the field, file or tensor at fault. Internal invariants may use ZO2_CHECK too:
// the cost of a branch is nothing next to a GEMM, and a message beats an abort.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace zo2 {

/// Base of every exception zo2 throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// A configuration value is invalid; `field()` names it (e.g. "eps").
class ConfigError : public Error {
 public:
  ConfigError(std::string field, const std::string& why)
      : Error("invalid config field '" + field + "': " + why), field_(std::move(field)) {}
  const std::string& field() const noexcept { return field_; }

 private:
  std::string field_;
};

/// A file could not be read or is malformed; `path()` names it.
class FileError : public Error {
 public:
  FileError(std::string path, const std::string& why)
      : Error(path + ": " + why), path_(std::move(path)) {}
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

/// Shapes or sizes that disagree (a tensor, a batch, a sequence).
class ShapeError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

}  // namespace zo2

/// Throws zo2::Error with the streamed message when `cond` is false.
#define ZO2_CHECK(cond, ...)                                                     \
  do {                                                                           \
    if (!(cond)) throw ::zo2::Error(::zo2::detail::concat(__VA_ARGS__));         \
  } while (0)
