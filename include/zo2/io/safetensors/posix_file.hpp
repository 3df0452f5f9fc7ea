// zo2/io/safetensors/posix_file.hpp -- the POSIX plumbing of the safetensors reader and writers
// (part of safetensors.hpp): an owned file descriptor, a read-only memory mapping, a write that
// loops over short writes, and a temporary file removed unless it was renamed into place.
#pragma once

#include <zo2/core/error.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace zo2::io {

namespace detail {

inline std::string errno_text() { return std::strerror(errno); }

/// Owns a file descriptor; closes it on scope exit.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  /// Closes now and reports whether close succeeded (a failed close can mean lost writes).
  bool close() noexcept {
    const int fd = std::exchange(fd_, -1);
    return fd < 0 || ::close(fd) == 0;
  }

 private:
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_;
};

/// A read-only private mapping of a whole file.
class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(data_, size_);
  }

  static std::unique_ptr<MappedFile> open(const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) throw FileError(path, "cannot open: " + errno_text());
    struct stat info {};
    if (::fstat(fd.get(), &info) != 0) throw FileError(path, "cannot stat: " + errno_text());
    if (!S_ISREG(info.st_mode)) throw FileError(path, "not a regular file");

    auto mapped = std::make_unique<MappedFile>();
    mapped->size_ = static_cast<std::size_t>(info.st_size);
    if (mapped->size_ == 0) return mapped;  // mmap refuses length 0; callers see an empty span
    void* data = ::mmap(nullptr, mapped->size_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (data == MAP_FAILED) throw FileError(path, "cannot mmap: " + errno_text());
    mapped->data_ = data;
    return mapped;  // the mapping stays valid after the descriptor closes
  }

  std::span<const std::byte> bytes() const noexcept {
    return {static_cast<const std::byte*>(data_), size_};
  }

  /// Drops this process's pages of `range` (a part of bytes()): they stop counting in its
  /// resident set, and a later read faults them in again from the file (or the page cache).
  /// Pages shared with neighbouring data are dropped too; that costs a re-read at most.
  void release(std::span<const std::byte> range) const noexcept {
    if (data_ == nullptr || range.empty()) return;
    const long page_size = ::sysconf(_SC_PAGESIZE);
    const std::size_t page = page_size > 0 ? static_cast<std::size_t>(page_size) : 4096;
    const auto base = reinterpret_cast<std::uintptr_t>(data_);
    const auto first = reinterpret_cast<std::uintptr_t>(range.data());
    if (first < base || first + range.size() > base + size_) return;  // not ours
    const std::uintptr_t begin = first / page * page;
    const std::uintptr_t end = std::min<std::uintptr_t>((first + range.size() + page - 1) / page * page,
                                                        (base + size_ + page - 1) / page * page);
    // Advice only: a failure leaves the pages resident, which is correct, just larger.
    ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

inline void write_all(int fd, const void* data, std::size_t size, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    // Linux writes at most ~2 GiB per call; ask for 1 GiB at a time and loop on short writes.
    const std::size_t chunk = std::min<std::size_t>(size, std::size_t{1} << 30);
    const ssize_t written = ::write(fd, p, chunk);
    if (written < 0) {
      if (errno == EINTR) continue;
      throw FileError(path, "write failed: " + errno_text());
    }
    p += written;
    size -= static_cast<std::size_t>(written);
  }
}

/// Removes the temporary file unless the write got as far as the rename.
class TempFileGuard {
 public:
  explicit TempFileGuard(std::string path) : path_(std::move(path)) {}
  TempFileGuard(const TempFileGuard&) = delete;
  TempFileGuard& operator=(const TempFileGuard&) = delete;
  ~TempFileGuard() {
    if (!released_) ::unlink(path_.c_str());
  }
  void release() noexcept { released_ = true; }

 private:
  std::string path_;
  bool released_ = false;
};

}  // namespace detail

}  // namespace zo2::io
