#include "checkpoint.hpp"

#include <cstdio>

#include <zo2/core/error.hpp>

#include "fs_util.hpp"
#include "model_setup.hpp"

namespace zo2_opt {

namespace fs = std::filesystem;

fs::path save_checkpoint(const fs::path& checkpoint_dir, std::uint64_t step, const zo2::opt::OPTConfig& config,
                         const zo2::ParameterStore<float>& store, const Tokenizer* tokenizer,
                         const nlohmann::json& state) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08llu", static_cast<unsigned long long>(step));
  const fs::path target = checkpoint_dir / name;
  export_model(target, config, store, tokenizer, kStateFile, state.dump(2) + "\n");
  return target;
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
