// zo2/io/safetensors.hpp -- read (memory-mapped) and write safetensors files, and open sharded
// Hugging Face checkpoints (model.safetensors.index.json) as one name space.
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
// N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}},
// then the data section; offsets are relative to its start. A file is untrusted input: every
// field is checked before a byte of tensor data is touched, and each failure names the file and
// the tensor.
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/dtype.hpp>
#include <zo2/io/json_limits.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace zo2::io {

/// One tensor of a safetensors file; `bytes` points into the file's mapping and lives as long
/// as the SafetensorsFile that handed it out.
struct TensorEntry {
  std::string name;
  Dtype dtype{};
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;

  std::size_t numel() const noexcept {
    std::size_t count = 1;
    for (std::int64_t dim : shape) count *= static_cast<std::size_t>(dim);
    return count;
  }
};

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

inline std::uint64_t read_le_u64(const std::byte* p) noexcept {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | std::to_integer<std::uint64_t>(p[i]);
  return value;
}

/// Reads a non-negative JSON integer that fits in uint64, or throws naming the field.
inline std::uint64_t json_to_u64(const nlohmann::json& value, const std::string& path,
                                 const std::string& what) {
  if (value.is_number_unsigned()) return value.get<std::uint64_t>();
  if (value.is_number_integer() && value.get<std::int64_t>() >= 0) {
    return static_cast<std::uint64_t>(value.get<std::int64_t>());
  }
  throw FileError(path, what + " must be a non-negative integer, got " + value.dump());
}

// Safetensors caps the header to keep a hostile length from exhausting memory.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

}  // namespace detail

/// A memory-mapped safetensors file whose header has been fully validated.
class SafetensorsFile {
 public:
  /// Opens and validates `path`; throws FileError naming the file (and tensor) on any defect.
  static SafetensorsFile open(const std::filesystem::path& path) {
    SafetensorsFile file;
    file.path_ = path.string();
    file.mapping_ = detail::MappedFile::open(file.path_);
    file.parse_header();
    return file;
  }

  const std::string& path() const noexcept { return path_; }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  /// The tensor called `name`; throws FileError naming the file and the tensor if absent.
  const TensorEntry& entry(const std::string& name) const {
    const auto found = index_.find(name);
    if (found == index_.end()) throw FileError(path_, "no tensor named '" + name + "'");
    return entries_[found->second];
  }

  /// Tensor names in the order their data lies in the file.
  std::vector<std::string> names() const {
    std::vector<std::string> result;
    result.reserve(entries_.size());
    for (const TensorEntry& e : entries_) result.push_back(e.name);
    return result;
  }

  const std::vector<TensorEntry>& entries() const noexcept { return entries_; }

  /// The free-form string map under "__metadata__" (empty when absent).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// Converts tensor `name` (F32, F16, BF16 or F64) to float into dst[0..n); n must equal the
  /// tensor's element count, so that a caller's shape mistake cannot go unnoticed.
  void read_as_float(const std::string& name, float* dst, std::size_t n) const {
    const TensorEntry& e = entry(name);
    if (n != e.numel()) {
      throw ShapeError(path_ + ": tensor '" + name + "' has " + std::to_string(e.numel()) +
                       " elements, caller asked for " + std::to_string(n));
    }
    convert_to_float(e, dst, path_);
  }

  std::vector<float> read_as_float(const std::string& name) const {
    std::vector<float> result(entry(name).numel());
    read_as_float(name, result.data(), result.size());
    return result;
  }

  /// Drops the pages of tensor `name` from this process's resident set (see
  /// detail::MappedFile::release): after a tensor has been converted, so that reading a whole
  /// checkpoint through the mapping never holds more than the tensors being read.
  void release(const std::string& name) const { mapping_->release(entry(name).bytes); }

  /// Shared by SafetensorsCheckpoint; `path` is only used for messages.
  static void convert_to_float(const TensorEntry& e, float* dst, const std::string& path) {
    convert_range_to_float(e, 0, e.numel(), dst, path);
  }

  /// Elements [first, first + count) of tensor `e` (F32, F16, BF16 or F64) as float into dst:
  /// a large tensor read in pieces. Throws FileError when the range lies outside the tensor.
  static void convert_range_to_float(const TensorEntry& e, std::size_t first, std::size_t count, float* dst,
                                     const std::string& path) {
    const std::size_t total = e.numel();
    if (first > total || count > total - first)
      throw FileError(path, "tensor '" + e.name + "': elements [" + std::to_string(first) + ", +" +
                                std::to_string(count) + ") lie outside its " + std::to_string(total));
    const std::byte* src = e.bytes.data() + first * dtype_size(e.dtype);
    const std::size_t n = count;
    // memcpy, not reinterpret_cast: the data section is only guaranteed byte-aligned.
    switch (e.dtype) {
      case Dtype::F32:
        if (n != 0) std::memcpy(dst, src, n * sizeof(float));
        return;
      case Dtype::F16:
      case Dtype::BF16: {
        const bool is_bf16 = e.dtype == Dtype::BF16;
        for (std::size_t i = 0; i < n; ++i) {
          std::uint16_t bits;
          std::memcpy(&bits, src + 2 * i, 2);
          dst[i] = is_bf16 ? bf16_to_float(bits) : fp16_to_float(bits);
        }
        return;
      }
      case Dtype::F64:
        for (std::size_t i = 0; i < n; ++i) {
          double value;
          std::memcpy(&value, src + 8 * i, 8);
          dst[i] = static_cast<float>(value);
        }
        return;
      default:
        throw FileError(path, "tensor '" + e.name + "' has dtype " +
                                  std::string(dtype_name(e.dtype)) +
                                  ", which does not convert to float (read its bytes instead)");
    }
  }

 private:
  SafetensorsFile() = default;

  [[noreturn]] void fail(const std::string& why) const { throw FileError(path_, why); }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& why) const {
    throw FileError(path_, "tensor '" + name + "': " + why);
  }

  void parse_header() {
    const std::span<const std::byte> file = mapping_->bytes();
    if (file.size() < 8) {
      fail("truncated: " + std::to_string(file.size()) +
           " bytes, too short for the 8-byte header length");
    }
    const std::uint64_t header_size = detail::read_le_u64(file.data());
    if (header_size > file.size() - 8) {
      fail("header length " + std::to_string(header_size) + " exceeds the file size " +
           std::to_string(file.size()) + " (truncated or not a safetensors file)");
    }
    if (header_size > detail::kMaxHeaderBytes) {
      fail("header length " + std::to_string(header_size) + " exceeds the 100 MB limit");
    }
    const auto* header_begin = reinterpret_cast<const char*>(file.data() + 8);
    check_json_depth({header_begin, static_cast<std::size_t>(header_size)}, path_);  // see json_limits.hpp
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(header_begin, header_begin + header_size);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) fail("header is not a JSON object");

    const std::span<const std::byte> data = file.subspan(8 + header_size);
    struct Range {
      std::uint64_t begin, end;
      std::size_t entry;
    };
    std::vector<Range> ranges;

    for (const auto& [name, info] : header.items()) {
      if (name == "__metadata__") {
        parse_metadata(info);
        continue;
      }
      if (!info.is_object()) fail_tensor(name, "header entry is not an object");
      TensorEntry e;
      e.name = name;

      if (!info.contains("dtype") || !info["dtype"].is_string()) {
        fail_tensor(name, "missing or non-string \"dtype\"");
      }
      const std::string dtype_text = info["dtype"].get<std::string>();
      const std::optional<Dtype> dtype = parse_dtype(dtype_text);
      if (!dtype) fail_tensor(name, "unknown dtype \"" + dtype_text + "\"");
      e.dtype = *dtype;

      if (!info.contains("shape") || !info["shape"].is_array()) {
        fail_tensor(name, "missing or non-array \"shape\"");
      }
      // A hostile shape must not wrap the byte count around to a small number: stop
      // multiplying once the product passes the data size (unless a later extent is 0).
      std::uint64_t expected_bytes = dtype_size(e.dtype);
      bool exceeds_data = false, has_zero_extent = false;
      for (const auto& dim : info["shape"]) {
        const std::uint64_t extent = detail::json_to_u64(dim, path_, "tensor '" + name + "': shape entry");
        if (extent > static_cast<std::uint64_t>(INT64_MAX)) fail_tensor(name, "shape entry too large");
        e.shape.push_back(static_cast<std::int64_t>(extent));
        if (extent == 0) has_zero_extent = true;
        if (exceeds_data || extent == 0) continue;
        if (expected_bytes > data.size() / extent) {
          exceeds_data = true;
        } else {
          expected_bytes *= extent;
        }
      }
      if (has_zero_extent) {
        expected_bytes = 0;
        exceeds_data = false;
      }

      if (!info.contains("data_offsets") || !info["data_offsets"].is_array() ||
          info["data_offsets"].size() != 2) {
        fail_tensor(name, "\"data_offsets\" must be an array [begin, end]");
      }
      const std::uint64_t begin =
          detail::json_to_u64(info["data_offsets"][0], path_, "tensor '" + name + "': data_offsets");
      const std::uint64_t end =
          detail::json_to_u64(info["data_offsets"][1], path_, "tensor '" + name + "': data_offsets");
      if (begin > end) {
        fail_tensor(name, "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                              "] end before they begin");
      }
      if (end > data.size()) {
        fail_tensor(name, "data_offsets end " + std::to_string(end) +
                              " lies beyond the data section of " + std::to_string(data.size()) +
                              " bytes (file truncated or offsets out of range)");
      }
      if (exceeds_data || expected_bytes != end - begin) {
        const std::string expected =
            exceeds_data ? std::string("more than the file holds") : std::to_string(expected_bytes);
        fail_tensor(name, "data_offsets span " + std::to_string(end - begin) + " bytes but shape x " +
                              dtype_text + " needs " + expected);
      }
      e.bytes = data.subspan(begin, end - begin);
      ranges.push_back({begin, end, entries_.size()});
      entries_.push_back(std::move(e));
    }

    std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    // Zero-byte tensors occupy no bytes and overlap nothing; among the others, each must begin
    // at or after the furthest end seen so far.
    const Range* furthest = nullptr;
    for (const Range& current : ranges) {
      if (current.begin == current.end) continue;
      if (furthest != nullptr && current.begin < furthest->end) {
        fail("tensors '" + entries_[furthest->entry].name + "' and '" +
             entries_[current.entry].name + "' have overlapping data_offsets");
      }
      if (furthest == nullptr || current.end > furthest->end) furthest = &current;
    }

    // Keep file order, which is the order a writer laid tensors down.
    std::vector<TensorEntry> ordered;
    ordered.reserve(entries_.size());
    for (const Range& r : ranges) ordered.push_back(std::move(entries_[r.entry]));
    entries_ = std::move(ordered);
    for (std::size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].name, i);
  }

  void parse_metadata(const nlohmann::json& info) {
    if (!info.is_object()) fail("\"__metadata__\" is not an object");
    for (const auto& [key, value] : info.items()) {
      if (!value.is_string()) fail("\"__metadata__\" value for '" + key + "' is not a string");
      metadata_.emplace(key, value.get<std::string>());
    }
  }

  std::string path_;
  std::unique_ptr<detail::MappedFile> mapping_;  // heap-held so entries stay valid after a move
  std::vector<TensorEntry> entries_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// A Hugging Face checkpoint: one model.safetensors or several shards listed by
/// model.safetensors.index.json, presented as one name space.
class SafetensorsCheckpoint {
 public:
  static constexpr const char* kSingleFileName = "model.safetensors";
  static constexpr const char* kIndexFileName = "model.safetensors.index.json";

  /// `path` is a directory (the index is preferred over a single file, as transformers does),
  /// an index .json file, or a single .safetensors file.
  static SafetensorsCheckpoint open(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      if (fs::exists(path / kIndexFileName, ec)) return open_index(path / kIndexFileName);
      if (fs::exists(path / kSingleFileName, ec)) return open_single(path / kSingleFileName);
      throw FileError(path.string(), std::string("directory holds neither ") + kIndexFileName +
                                         " nor " + kSingleFileName);
    }
    if (path.extension() == ".json") return open_index(path);
    return open_single(path);
  }

  bool contains(const std::string& name) const { return owner_.count(name) != 0; }

  /// Throws FileError naming the checkpoint and the tensor if absent.
  const TensorEntry& entry(const std::string& name) const {
    const auto found = owner_.find(name);
    if (found == owner_.end()) throw FileError(source_, "no tensor named '" + name + "'");
    return shards_[found->second].entry(name);
  }

  /// Names grouped by shard (in the order shards are listed), in file order within a shard.
  const std::vector<std::string>& names() const noexcept { return names_; }

  void read_as_float(const std::string& name, float* dst, std::size_t n) const {
    const auto found = owner_.find(name);
    if (found == owner_.end()) throw FileError(source_, "no tensor named '" + name + "'");
    shards_[found->second].read_as_float(name, dst, n);
  }

  std::vector<float> read_as_float(const std::string& name) const {
    std::vector<float> result(entry(name).numel());
    read_as_float(name, result.data(), result.size());
    return result;
  }

  /// Drops tensor `name`'s pages from the resident set once it has been read (see
  /// SafetensorsFile::release).
  void release(const std::string& name) const {
    const auto found = owner_.find(name);
    if (found == owner_.end()) throw FileError(source_, "no tensor named '" + name + "'");
    shards_[found->second].release(name);
  }

  /// The file that holds tensor `name` (its shard, for a sharded checkpoint); throws FileError
  /// naming the checkpoint if absent.
  const std::string& file_of(const std::string& name) const {
    const auto found = owner_.find(name);
    if (found == owner_.end()) throw FileError(source_, "no tensor named '" + name + "'");
    return shards_[found->second].path();
  }

  /// The index's "metadata" object (as strings), or the single file's __metadata__.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// The index file or the single file this checkpoint was opened from.
  const std::string& source() const noexcept { return source_; }

  const std::vector<SafetensorsFile>& shards() const noexcept { return shards_; }

 private:
  SafetensorsCheckpoint() = default;

  static SafetensorsCheckpoint open_single(const std::filesystem::path& file_path) {
    SafetensorsCheckpoint checkpoint;
    checkpoint.source_ = file_path.string();
    checkpoint.shards_.push_back(SafetensorsFile::open(file_path));
    const SafetensorsFile& only = checkpoint.shards_.front();
    checkpoint.metadata_ = only.metadata();
    for (const std::string& name : only.names()) {
      checkpoint.owner_.emplace(name, 0);
      checkpoint.names_.push_back(name);
    }
    return checkpoint;
  }

  static SafetensorsCheckpoint open_index(const std::filesystem::path& index_path) {
    namespace fs = std::filesystem;
    SafetensorsCheckpoint checkpoint;
    const std::string source = index_path.string();
    checkpoint.source_ = source;

    const auto mapping = detail::MappedFile::open(source);
    const auto text = mapping->bytes();
    check_json_depth({reinterpret_cast<const char*>(text.data()), text.size()}, source);
    nlohmann::ordered_json index;
    try {
      index = nlohmann::ordered_json::parse(reinterpret_cast<const char*>(text.data()),
                                            reinterpret_cast<const char*>(text.data()) + text.size());
    } catch (const nlohmann::json::exception& e) {
      throw FileError(source, std::string("not valid JSON: ") + e.what());
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      throw FileError(source, "missing \"weight_map\" object");
    }
    if (index.contains("metadata") && index["metadata"].is_object()) {
      for (const auto& [key, value] : index["metadata"].items()) {
        checkpoint.metadata_.emplace(key, value.is_string() ? value.get<std::string>() : value.dump());
      }
    }

    std::map<std::string, std::size_t> shard_of_file;
    std::vector<std::vector<std::string>> listed_names;  // per shard, in index order
    for (const auto& [name, shard_value] : index["weight_map"].items()) {
      if (!shard_value.is_string()) {
        throw FileError(source, "weight_map entry for tensor '" + name + "' is not a string");
      }
      const std::string shard_name = shard_value.get<std::string>();
      const fs::path relative(shard_name);
      // Shards live beside the index; refusing escapes keeps a downloaded index from reading
      // arbitrary files.
      if (relative.empty() || relative.is_absolute() ||
          std::any_of(relative.begin(), relative.end(), [](const fs::path& part) { return part == ".."; })) {
        throw FileError(source, "tensor '" + name + "' names shard '" + shard_name +
                                    "', which is not a path inside the checkpoint directory");
      }
      auto [it, inserted] = shard_of_file.emplace(shard_name, checkpoint.shards_.size());
      if (inserted) {
        const fs::path shard_path = index_path.parent_path() / relative;
        std::error_code ec;
        if (!fs::exists(shard_path, ec)) {
          throw FileError(source, "shard '" + shard_name + "' (listed for tensor '" + name +
                                      "') is missing: " + shard_path.string());
        }
        checkpoint.shards_.push_back(SafetensorsFile::open(shard_path));
        listed_names.emplace_back();
      }
      listed_names[it->second].push_back(name);
      checkpoint.owner_.emplace(name, it->second);
    }

    for (std::size_t s = 0; s < checkpoint.shards_.size(); ++s) {
      const SafetensorsFile& shard = checkpoint.shards_[s];
      for (const std::string& name : listed_names[s]) {
        if (!shard.contains(name)) {
          throw FileError(source, "tensor '" + name + "' is mapped to shard '" + shard.path() +
                                      "', which does not contain it");
        }
      }
      for (const std::string& name : shard.names()) {
        const auto owner = checkpoint.owner_.find(name);
        if (owner != checkpoint.owner_.end() && owner->second == s) checkpoint.names_.push_back(name);
      }
    }
    return checkpoint;
  }

  std::string source_;
  std::vector<SafetensorsFile> shards_;
  std::unordered_map<std::string, std::size_t> owner_;  // tensor name -> shard
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

// ---- writer -------------------------------------------------------------------------------

/// One tensor to write; `data` holds numel * dtype_size bytes in row-major order.
struct TensorToWrite {
  std::string name;
  Dtype dtype{};
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
};

namespace detail {

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

/// Writes a safetensors file that the `safetensors` and `transformers` packages load: tensors
/// laid down contiguously in the given order, the JSON header padded with spaces to a multiple
/// of 8 bytes so the data section is 8-aligned. The write is atomic: the bytes go to
/// `<path>.tmp.<pid>`, are fsync'ed, and the file is renamed over `path`, so a crash leaves
/// either the old file or the new one, never a torn one.
inline void write_safetensors(const std::filesystem::path& path,
                              const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  const std::string target = path.string();

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  std::vector<std::size_t> byte_sizes;
  byte_sizes.reserve(tensors.size());
  std::uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") {
      throw FileError(target, "invalid tensor name '" + t.name + "'");
    }
    if (header.contains(t.name)) throw FileError(target, "tensor '" + t.name + "' given twice");
    std::size_t numel = 1;
    for (std::int64_t dim : t.shape) {
      if (dim < 0) throw FileError(target, "tensor '" + t.name + "' has a negative dimension");
      numel *= static_cast<std::size_t>(dim);
    }
    const std::size_t bytes = numel * dtype_size(t.dtype);
    if (bytes != 0 && t.data == nullptr) {
      throw FileError(target, "tensor '" + t.name + "' has no data pointer");
    }
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    byte_sizes.push_back(bytes);
    offset += bytes;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  unsigned char length_bytes[8];
  for (int i = 0; i < 8; ++i) {
    length_bytes[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(header_text.size()) >> (8 * i));
  }

  const std::string temp = target + ".tmp." + std::to_string(::getpid());
  detail::TempFileGuard guard(temp);
  detail::UniqueFd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) throw FileError(target, "cannot create " + temp + ": " + detail::errno_text());
  detail::write_all(fd.get(), length_bytes, 8, temp);
  detail::write_all(fd.get(), header_text.data(), header_text.size(), temp);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    detail::write_all(fd.get(), tensors[i].data, byte_sizes[i], temp);
  }
  if (::fsync(fd.get()) != 0) throw FileError(target, "fsync of " + temp + " failed: " + detail::errno_text());
  if (!fd.close()) throw FileError(target, "close of " + temp + " failed: " + detail::errno_text());
  if (::rename(temp.c_str(), target.c_str()) != 0) {
    throw FileError(target, "cannot rename " + temp + " into place: " + detail::errno_text());
  }
  guard.release();

  // Make the rename itself durable; failing here is not an error, the data is already safe.
  std::filesystem::path directory = path.parent_path();
  if (directory.empty()) directory = ".";
  detail::UniqueFd dir_fd(::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() >= 0) ::fsync(dir_fd.get());
}


// ---- sharded writer -------------------------------------------------------------------------

/// A tensor's name, dtype and shape: what a header needs before any of its bytes exist.
struct TensorHeader {
  std::string name;
  Dtype dtype{};
  std::vector<std::int64_t> shape;
};

/// The largest shard ShardedSafetensorsWriter writes unless told otherwise (2 GB, decimal like
/// transformers' max_shard_size): a tensor larger than this gets a shard of its own.
inline constexpr std::uint64_t kDefaultMaxShardBytes = 2'000'000'000;

/// transformers' shard file name: model-00001-of-00003.safetensors.
inline std::string shard_file_name(std::size_t index, std::size_t count) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

/// Writes a checkpoint's tensors as they are produced, one at a time, into shards of at most
/// `max_shard_bytes` of tensor data each (in the given order; a tensor is never split). Every
/// header is known from the names, dtypes and shapes alone, so each shard's header is written
/// first and the data streamed after it: nothing but the tensor being written is held in memory.
/// One shard is `model.safetensors` (no index); several are model-0000i-of-0000n.safetensors
/// plus model.safetensors.index.json, as transformers' save_pretrained writes them
/// ({"metadata": {"total_parameters", "total_size"}, "weight_map"}, keys sorted, indent 2). Each shard goes to a
/// temporary file, is fsync'ed and renamed into place when complete; finish() then writes the
/// index (atomically) and removes what a previous save left that would shadow or confuse the
/// new files: a stale index or single file, and shards of another count.
class ShardedSafetensorsWriter {
 public:
  ShardedSafetensorsWriter(std::filesystem::path directory, std::vector<TensorHeader> tensors,
                           std::uint64_t max_shard_bytes = kDefaultMaxShardBytes,
                           std::map<std::string, std::string> metadata = {})
      : directory_(std::move(directory)), tensors_(std::move(tensors)), metadata_(std::move(metadata)) {
    if (max_shard_bytes == 0) throw FileError(directory_.string(), "max_shard_bytes must be positive");
    std::map<std::string, bool> seen;
    std::uint64_t shard_bytes = 0;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const TensorHeader& t = tensors_[i];
      const std::string where = (directory_ / "model.safetensors").string();
      if (t.name.empty() || t.name == "__metadata__") throw FileError(where, "invalid tensor name '" + t.name + "'");
      if (!seen.emplace(t.name, true).second) throw FileError(where, "tensor '" + t.name + "' given twice");
      std::uint64_t numel = 1;
      for (std::int64_t dim : t.shape) {
        if (dim < 0) throw FileError(where, "tensor '" + t.name + "' has a negative dimension");
        numel *= static_cast<std::uint64_t>(dim);
      }
      const std::uint64_t bytes = numel * dtype_size(t.dtype);
      sizes_.push_back(bytes);
      total_bytes_ += bytes;
      total_elements_ += numel;
      if (first_of_shard_.empty() || (shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes)) {
        first_of_shard_.push_back(i);
        shard_bytes = 0;
      }
      shard_bytes += bytes;
      shard_of_.push_back(first_of_shard_.size() - 1);
    }
    if (first_of_shard_.empty()) first_of_shard_.push_back(0);  // no tensors: one empty file
    for (std::size_t s = 0; s < first_of_shard_.size(); ++s)
      file_names_.push_back(first_of_shard_.size() == 1 ? std::string(SafetensorsCheckpoint::kSingleFileName)
                                                        : shard_file_name(s, first_of_shard_.size()));
  }
  ShardedSafetensorsWriter(const ShardedSafetensorsWriter&) = delete;
  ShardedSafetensorsWriter& operator=(const ShardedSafetensorsWriter&) = delete;
  ~ShardedSafetensorsWriter() {
    if (!open_temp_.empty()) ::unlink(open_temp_.c_str());
  }

  /// The files, in order: model.safetensors, or the shards.
  const std::vector<std::string>& file_names() const noexcept { return file_names_; }
  std::size_t num_shards() const noexcept { return file_names_.size(); }
  /// Bytes of tensor data in all shards (the index's total_size).
  std::uint64_t total_bytes() const noexcept { return total_bytes_; }
  /// The name of the tensor write() expects next ("" once all are written).
  const std::string& next_name() const {
    static const std::string none;
    return next_ < tensors_.size() ? tensors_[next_].name : none;
  }

  /// Appends the next tensor's bytes (numel x dtype size of them, row-major): `name` must be
  /// the next tensor of the list the writer was made with.
  void write(const std::string& name, std::span<const std::byte> bytes) {
    if (next_ >= tensors_.size())
      throw FileError(directory_.string(), "tensor '" + name + "' written after the last listed tensor");
    if (name != tensors_[next_].name)
      throw FileError(directory_.string(), "tensor '" + name + "' written where '" + tensors_[next_].name +
                                               "' comes next");
    if (bytes.size() != sizes_[next_])
      throw FileError(directory_.string(), "tensor '" + name + "' written with " + std::to_string(bytes.size()) +
                                               " bytes, its shape and dtype need " + std::to_string(sizes_[next_]));
    const std::size_t shard = shard_of_[next_];
    if (next_ == first_of_shard_[shard]) open_shard(shard);
    if (!bytes.empty()) detail::write_all(fd_.get(), bytes.data(), bytes.size(), open_temp_);
    ++next_;
    if (next_ == tensors_.size() || shard_of_[next_] != shard) close_shard(shard);
  }

  /// After the last tensor: writes the index (several shards) and removes stale files.
  void finish() {
    if (next_ != tensors_.size())
      throw FileError(directory_.string(), "finish() before tensor '" + tensors_[next_].name + "' was written");
    if (tensors_.empty() && fd_.get() < 0 && !finished_shard_) {
      open_shard(0);
      close_shard(0);
    }
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path index = directory_ / SafetensorsCheckpoint::kIndexFileName;
    if (file_names_.size() == 1) {
      fs::remove(index, ec);  // it would be preferred over the new file
    } else {
      nlohmann::json weight_map = nlohmann::json::object();  // keys sorted, as json.dumps(sort_keys=True)
      for (std::size_t i = 0; i < tensors_.size(); ++i) weight_map[tensors_[i].name] = file_names_[shard_of_[i]];
      const nlohmann::json content = {
          {"metadata", {{"total_parameters", total_elements_}, {"total_size", total_bytes_}}},
          {"weight_map", std::move(weight_map)}};
      write_text_file(index, content.dump(2) + "\n");
      // transformers loads a model.safetensors before an index: a stale one would shadow the shards.
      fs::remove(directory_ / SafetensorsCheckpoint::kSingleFileName, ec);
    }
    // Shards of an earlier save with another count (same-count names were replaced).
    std::vector<fs::path> stale;
    for (const auto& entry : fs::directory_iterator(directory_, ec)) {
      const std::string n = entry.path().filename().string();
      if (n.size() == 32 && n.rfind("model-", 0) == 0 && n.compare(11, 4, "-of-") == 0 &&
          n.compare(20, 12, ".safetensors") == 0 &&
          std::find(file_names_.begin(), file_names_.end(), n) == file_names_.end())
        stale.push_back(entry.path());
    }
    for (const fs::path& path : stale) fs::remove(path, ec);
    sync_directory();
  }

  /// `text` into `path` atomically (temporary file, fsync, rename).
  static void write_text_file(const std::filesystem::path& path, const std::string& text) {
    const std::string target = path.string();
    const std::string temp = target + ".tmp." + std::to_string(::getpid());
    detail::TempFileGuard guard(temp);
    detail::UniqueFd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) throw FileError(target, "cannot create " + temp + ": " + detail::errno_text());
    detail::write_all(fd.get(), text.data(), text.size(), temp);
    if (::fsync(fd.get()) != 0) throw FileError(target, "fsync of " + temp + " failed: " + detail::errno_text());
    if (!fd.close()) throw FileError(target, "close of " + temp + " failed: " + detail::errno_text());
    if (::rename(temp.c_str(), target.c_str()) != 0)
      throw FileError(target, "cannot rename " + temp + " into place: " + detail::errno_text());
    guard.release();
  }

 private:
  void open_shard(std::size_t shard) {
    const std::size_t begin = first_of_shard_[shard];
    const std::size_t end = shard + 1 < first_of_shard_.size() ? first_of_shard_[shard + 1] : tensors_.size();
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json meta = nlohmann::ordered_json::object();
      for (const auto& [key, value] : metadata_) meta[key] = value;
      header["__metadata__"] = std::move(meta);
    }
    std::uint64_t offset = 0;
    for (std::size_t i = begin; i < end; ++i) {
      header[tensors_[i].name] = {{"dtype", std::string(dtype_name(tensors_[i].dtype))},
                                  {"shape", tensors_[i].shape},
                                  {"data_offsets", {offset, offset + sizes_[i]}}};
      offset += sizes_[i];
    }
    std::string header_text = header.dump();
    header_text.append((8 - header_text.size() % 8) % 8, ' ');
    unsigned char length_bytes[8];
    for (int i = 0; i < 8; ++i)
      length_bytes[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(header_text.size()) >> (8 * i));

    const std::string target = (directory_ / file_names_[shard]).string();
    open_temp_ = target + ".tmp." + std::to_string(::getpid());
    fd_ = detail::UniqueFd(::open(open_temp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd_.get() < 0) {
      const std::string temp = std::exchange(open_temp_, std::string());
      throw FileError(target, "cannot create " + temp + ": " + detail::errno_text());
    }
    detail::write_all(fd_.get(), length_bytes, 8, open_temp_);
    detail::write_all(fd_.get(), header_text.data(), header_text.size(), open_temp_);
  }

  void close_shard(std::size_t shard) {
    const std::string target = (directory_ / file_names_[shard]).string();
    if (::fsync(fd_.get()) != 0) throw FileError(target, "fsync of " + open_temp_ + " failed: " + detail::errno_text());
    if (!fd_.close()) throw FileError(target, "close of " + open_temp_ + " failed: " + detail::errno_text());
    if (::rename(open_temp_.c_str(), target.c_str()) != 0)
      throw FileError(target, "cannot rename " + open_temp_ + " into place: " + detail::errno_text());
    open_temp_.clear();
    finished_shard_ = true;
  }

  void sync_directory() const {
    // Makes the renames durable; failing here is not an error, the data is already safe.
    detail::UniqueFd dir_fd(::open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir_fd.get() >= 0) ::fsync(dir_fd.get());
  }

  std::filesystem::path directory_;
  std::vector<TensorHeader> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::uint64_t> sizes_;
  std::vector<std::size_t> shard_of_;        // per tensor
  std::vector<std::size_t> first_of_shard_;  // per shard: its first tensor
  std::vector<std::string> file_names_;
  std::uint64_t total_bytes_ = 0, total_elements_ = 0;
  std::size_t next_ = 0;
  detail::UniqueFd fd_;
  std::string open_temp_;  // the shard being written (removed if the writer dies before it is renamed)
  bool finished_shard_ = false;
};

}  // namespace zo2::io
