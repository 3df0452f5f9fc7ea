#include "checkpoint.hpp"

#include <cstdio>

#include <zo2/core/error.hpp>
#include <zo2/io/safetensors.hpp>

#include "fs_util.hpp"
#include "model_setup.hpp"

namespace zo2_opt {

namespace fs = std::filesystem;

fs::path save_checkpoint(const fs::path& checkpoint_dir, std::uint64_t step, const zo2::opt::OPTConfig& config,
                         const zo2::ParameterStore<float>& store, const Tokenizer* tokenizer,
                         const nlohmann::json& state, const EncodedState* encoded) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08llu", static_cast<unsigned long long>(step));
  const fs::path target = checkpoint_dir / name;
  export_model(target, config, store, tokenizer, [&](const fs::path& staging) {
    write_file_synced(staging / kStateFile, state.dump(2) + "\n");
    if (!encoded) return;
    std::vector<zo2::io::TensorToWrite> tensors;
    for (std::size_t g = 0; g < encoded->groups.size(); ++g)
      tensors.push_back({"group." + std::to_string(g), zo2::io::Dtype::U8,
                         {static_cast<std::int64_t>(encoded->groups[g].size())}, encoded->groups[g].data()});
    zo2::io::write_safetensors(staging / kEncodedStateFile, tensors,
                               {{"codec", encoded->codec}, {"groups", std::to_string(encoded->groups.size())}});
  });
  return target;
}

std::optional<EncodedState> read_encoded_state(const fs::path& checkpoint) {
  const fs::path file = checkpoint / kEncodedStateFile;
  if (!fs::exists(file)) return std::nullopt;
  const auto st = zo2::io::SafetensorsFile::open(file);
  const auto& meta = st.metadata();
  const auto codec = meta.find("codec"), groups = meta.find("groups");
  if (codec == meta.end() || groups == meta.end())
    throw zo2::FileError(file.string(), "no \"codec\" and \"groups\" in __metadata__");
  EncodedState out{codec->second, {}};
  std::size_t n = 0;
  try {
    n = std::stoull(groups->second);
  } catch (const std::exception&) {
    throw zo2::FileError(file.string(), "__metadata__ \"groups\" is not a count: '" + groups->second + "'");
  }
  for (std::size_t g = 0; g < n; ++g) {
    const std::string name = "group." + std::to_string(g);
    const auto& t = st.entry(name);
    if (t.dtype != zo2::io::Dtype::U8) throw zo2::FileError(file.string(), name + " is not U8");
    const auto* p = reinterpret_cast<const unsigned char*>(t.bytes.data());
    out.groups.emplace_back(p, p + t.bytes.size());
  }
  return out;
}

fs::path find_checkpoint(const fs::path& dir) {
  if (fs::exists(dir / kStateFile)) return dir;
  if (!fs::is_directory(dir)) throw zo2::FileError(dir.string(), "no such checkpoint directory");
  fs::path best;
  unsigned long long best_step = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string n = entry.path().filename().string();
    // "step-<digits>" only: not a "step-N.old.PID" left by an interrupted replacement.
    if (!entry.is_directory() || n.size() < 6 || n.rfind("step-", 0) != 0 ||
        n.find_first_not_of("0123456789", 5) != std::string::npos || !fs::exists(entry.path() / kStateFile))
      continue;
    const unsigned long long step = std::stoull(n.substr(5));
    if (best.empty() || step > best_step) {
      best = entry.path();
      best_step = step;
    }
  }
  if (best.empty()) throw zo2::FileError((dir / kStateFile).string(), "missing (not a checkpoint, and no step-*/state.json inside)");
  return best;
}

fs::path resolve_model_dir(const fs::path& dir) {
  if (fs::exists(dir / "config.json") || !fs::is_directory(dir)) return dir;
  try {
    return find_checkpoint(dir);
  } catch (const zo2::Error&) {
    return dir;
  }
}

nlohmann::json read_state(const fs::path& checkpoint) {
  const fs::path file = checkpoint / kStateFile;
  try {
    auto j = nlohmann::json::parse(read_file(file));
    if (!j.is_object() || !j.contains("step") || !j.contains("seed"))
      throw zo2::FileError(file.string(), "not a zo2-opt state file (needs \"step\" and \"seed\")");
    return j;
  } catch (const nlohmann::json::exception& e) {
    throw zo2::FileError(file.string(), std::string("not valid JSON: ") + e.what());
  }
}

}  // namespace zo2_opt
