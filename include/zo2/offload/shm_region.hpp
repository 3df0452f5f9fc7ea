// zo2/offload/shm_region.hpp -- a named POSIX shared memory region (Linux), mapped read-write
// into this process: what the processes of one host share, e.g. a VersionBoard's region
// (version_board.hpp) when each data-parallel rank is its own process.
//
//   auto r = ShmRegion::create("/zo2-board-1234", bytes);             // one process creates it
//   auto r = ShmRegion::attach("/zo2-board-1234", bytes, 10s);        // the others attach
//
// create() makes a new name (shm_open O_CREAT | O_EXCL, mode 0600: an existing name is an Error,
// never reused), sizes it (ftruncate: the kernel fills it with zeros), reserves its pages
// (posix_fallocate: a /dev/shm too small for it is an Error here, never a SIGBUS later) and maps
// it (MAP_SHARED).
// attach() retries until the creator's name exists with exactly `bytes` bytes, or throws after
// `wait`. The creator unlinks the name when its ShmRegion is destroyed, or earlier with unlink()
// (once every process has attached: the mappings live on, and nothing is left in /dev/shm if a
// process dies later); every ShmRegion unmaps its mapping when destroyed. A creator killed
// before it unlinked leaves the name in /dev/shm, and a later create() of that name is an Error
// until it is removed (rm /dev/shm/<name>): give each run its own name (e.g. with the creator's
// pid in it).
//
// Every failing call throws zo2::Error naming the region, the call and strerror(errno); a name
// that does not start with '/' or holds another '/' is a ConfigError("name"). glibc 2.34 and
// later carry shm_open in libc; for older ones CMake links librt to zo2::core.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>
#include <utility>

#include <zo2/core/error.hpp>

namespace zo2::offload {

/// RAII over a mapped POSIX shared memory region (see the file comment). Movable, not copyable.
class ShmRegion {
 public:
  /// Creates the region `name` ("/something") of `bytes` bytes, zero-filled, and maps it; this
  /// object unlinks the name when destroyed (or at unlink()). An existing name is an Error.
  static ShmRegion create(const std::string& name, std::size_t bytes) {
    check(name, bytes);
    const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) fail(name, "shm_open(O_CREAT | O_EXCL)");
    ShmRegion r;
    r.name_ = name;
    r.unlink_ = true;  // from here on the destructor removes the name, on every error below too
    if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) fail_closing(fd, name, "ftruncate");
    // Reserve the pages now: a /dev/shm too small (a container's default is 64 MB) is this
    // error, not a SIGBUS when a page is first touched.
    if (const int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); rc != 0) {
      ::close(fd);
      throw Error("shared memory region '" + name + "': cannot reserve " + std::to_string(bytes) + " bytes (" +
                  std::to_string(bytes >> 20) + " MiB) in /dev/shm: " + std::strerror(rc) +
                  (rc == ENOSPC ? std::string(" (/dev/shm is too small: see df /dev/shm; a container needs a larger "
                                              "--shm-size)")
                                : std::string()));
    }
    r.map(fd, bytes);
    return r;
  }

  /// Maps the region `name` of exactly `bytes` bytes that another process creates: retries
  /// until the name exists with that size, or throws an Error naming it after `wait`. bytes = 0:
  /// whatever size it has once its creator has sized it (more than 0; a header inside says more).
  static ShmRegion attach(const std::string& name, std::size_t bytes, std::chrono::milliseconds wait) {
    check_name(name);
    const auto deadline = std::chrono::steady_clock::now() + wait;
    auto pause = std::chrono::milliseconds(1);
    std::string seen = "does not exist";
    for (;;) {
      const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
      if (fd < 0 && errno != ENOENT) fail(name, "shm_open");
      if (fd >= 0) {
        struct stat st {};
        if (::fstat(fd, &st) != 0) fail_closing(fd, name, "fstat");
        const auto size = static_cast<std::size_t>(st.st_size);
        if (size == bytes || (bytes == 0 && size > 0)) {
          ShmRegion r;
          r.name_ = name;
          r.map(fd, size);
          return r;
        }
        seen = "has " + std::to_string(st.st_size) + " bytes";  // 0: its creator has not sized it yet
        ::close(fd);
      }
      if (std::chrono::steady_clock::now() >= deadline)
        throw Error("shared memory region '" + name + "': waited " + std::to_string(wait.count()) +
                    " ms for it to exist with " + (bytes ? std::to_string(bytes) + " bytes" : std::string("a size")) + "; it " + seen);
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::milliseconds(20));
    }
  }

  ShmRegion(ShmRegion&& o) noexcept
      : name_(std::move(o.name_)), data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
        unlink_(std::exchange(o.unlink_, false)) {}
  ShmRegion& operator=(ShmRegion&& o) noexcept {
    if (this != &o) {
      release();
      name_ = std::move(o.name_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      unlink_ = std::exchange(o.unlink_, false);
    }
    return *this;
  }
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;
  ~ShmRegion() { release(); }

  void* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& name() const { return name_; }

  /// The creator removes the name now (the mapping stays); later calls, and an attacher's, do
  /// nothing.
  void unlink() {
    if (!unlink_) return;
    unlink_ = false;
    if (::shm_unlink(name_.c_str()) != 0 && errno != ENOENT) fail(name_, "shm_unlink");
  }

 private:
  ShmRegion() = default;

  static void check_name(const std::string& name) {
    if (name.size() < 2 || name[0] != '/' || name.find('/', 1) != std::string::npos)
      throw ConfigError("name", "a shared memory region's name is '/' and a name without '/', not '" + name + "'");
  }
  static void check(const std::string& name, std::size_t bytes) {
    check_name(name);
    if (bytes == 0) throw ConfigError("bytes", "shared memory region '" + name + "' of 0 bytes");
  }
  [[noreturn]] static void fail(const std::string& name, const char* call) {
    throw Error("shared memory region '" + name + "': " + call + " failed: " + std::strerror(errno));
  }
  [[noreturn]] static void fail_closing(int fd, const std::string& name, const char* call) {
    const int e = errno;
    ::close(fd);
    errno = e;
    fail(name, call);
  }

  void map(int fd, std::size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) fail_closing(fd, name_, "mmap");
    ::close(fd);  // the mapping keeps the memory
    data_ = p;
    size_ = bytes;
  }

  void release() noexcept {
    if (data_) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
    if (unlink_) ::shm_unlink(name_.c_str());
    unlink_ = false;
  }

  std::string name_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
  bool unlink_ = false;  // the creator, until it unlinked
};

}  // namespace zo2::offload
