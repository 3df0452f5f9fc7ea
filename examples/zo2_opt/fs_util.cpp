#include "fs_util.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fcntl.h>
#include <unistd.h>

#include <zo2/core/error.hpp>

namespace zo2_opt {

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw zo2::FileError(path.string(), std::filesystem::exists(path) ? "cannot open" : "no such file");
  std::ostringstream os;
  os << in.rdbuf();
  if (in.bad()) throw zo2::FileError(path.string(), "read failed");
  return os.str();
}

void fsync_path(const std::filesystem::path& path) {
  const bool dir = std::filesystem::is_directory(path);
  const int fd = ::open(path.c_str(), (dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) throw zo2::FileError(path.string(), std::string("cannot open for fsync: ") + std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0 && !dir) throw zo2::FileError(path.string(), std::string("fsync failed: ") + std::strerror(errno));
}

void write_file_synced(const std::filesystem::path& path, const std::string& content) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) throw zo2::FileError(path.string(), "cannot create");
    out << content;
    out.flush();
    if (!out) throw zo2::FileError(path.string(), "write failed");
  }
  fsync_path(path);
}

void publish_directory(const std::filesystem::path& staging, const std::filesystem::path& target) {
  for (const auto& entry : std::filesystem::directory_iterator(staging))
    if (entry.is_regular_file()) fsync_path(entry.path());
  fsync_path(staging);
  std::error_code ec;
  std::filesystem::path old;
  if (std::filesystem::exists(target)) {
    // A directory cannot be renamed over a non-empty one: move the old one aside first.
    old = target.string() + ".old." + std::to_string(::getpid());
    std::filesystem::rename(target, old, ec);
    if (ec) throw zo2::FileError(target.string(), "cannot move the previous version aside: " + ec.message());
  }
  std::filesystem::rename(staging, target, ec);
  if (ec) throw zo2::FileError(target.string(), "cannot rename " + staging.string() + " into place: " + ec.message());
  fsync_path(target.parent_path().empty() ? std::filesystem::path(".") : target.parent_path());
  if (!old.empty()) std::filesystem::remove_all(old, ec);
}

}  // namespace zo2_opt
