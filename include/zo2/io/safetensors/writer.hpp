// zo2/io/safetensors/writer.hpp -- one safetensors file written atomically from tensors in
// memory (part of safetensors.hpp).
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/dtype.hpp>
#include <zo2/io/safetensors/posix_file.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace zo2::io {

/// One tensor to write; `data` holds numel * dtype_size bytes in row-major order.
struct TensorToWrite {
  std::string name;
  Dtype dtype{};
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
};

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

}  // namespace zo2::io
