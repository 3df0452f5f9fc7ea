// zo2/io/safetensors/checkpoint.hpp -- a Hugging Face checkpoint, one model.safetensors or the
// shards model.safetensors.index.json lists, as one name space (part of safetensors.hpp).
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/json_limits.hpp>
#include <zo2/io/safetensors/reader.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace zo2::io {

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

}  // namespace zo2::io
