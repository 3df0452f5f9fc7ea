// zo2/io/safetensors/sharded_writer.hpp -- a checkpoint written tensor by tensor into shards
// and an index, as transformers' save_pretrained lays them out (part of safetensors.hpp).
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/dtype.hpp>
#include <zo2/io/safetensors/checkpoint.hpp>  // SafetensorsCheckpoint's file names
#include <zo2/io/safetensors/posix_file.hpp>
#include <zo2/io/safetensors/writer.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace zo2::io {

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
