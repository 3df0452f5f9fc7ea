// zo2/io/safetensors/reader.hpp -- one safetensors file, memory-mapped, its header checked
// field by field before a byte of tensor data is touched (part of safetensors.hpp).
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/dtype.hpp>
#include <zo2/io/json_limits.hpp>
#include <zo2/io/safetensors/posix_file.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

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

}  // namespace zo2::io
