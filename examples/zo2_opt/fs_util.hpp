// zo2-opt: small file helpers: whole-file reads, fsync'ed writes, atomic directory publication.
#pragma once

#include <filesystem>
#include <string>

namespace zo2_opt {

std::string read_file(const std::filesystem::path& path);
/// Writes `content` to `path` and fsyncs it (no rename: used inside a temporary directory).
void write_file_synced(const std::filesystem::path& path, const std::string& content);
void fsync_path(const std::filesystem::path& path);
/// Makes `staging` (a fully written, fsync'ed directory) appear as `target` in one rename,
/// replacing an older `target` if there is one, then fsyncs the parent directory.
void publish_directory(const std::filesystem::path& staging, const std::filesystem::path& target);

}  // namespace zo2_opt
