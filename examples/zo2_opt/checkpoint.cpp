#include "checkpoint.hpp"

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>

#include <zo2/core/error.hpp>
#include <zo2/io/json_limits.hpp>
#include <zo2/io/safetensors.hpp>

#include "cli.hpp"
#include "fs_util.hpp"
#include "model_setup.hpp"

namespace zo2_opt {

namespace fs = std::filesystem;

fs::path save_checkpoint(const fs::path& checkpoint_dir, std::uint64_t step, const ModelConfig& config,
                         const zo2::ModelLayout& layout, const GroupReader& read_group, const Tokenizer* tokenizer,
                         const nlohmann::json& state, const EncodedState* encoded, const RuleState* rule_state) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08llu", static_cast<unsigned long long>(step));
  const fs::path target = checkpoint_dir / name;
  export_model(target, config, layout, read_group, tokenizer, [&](const fs::path& staging) {
    write_file_synced(staging / kStateFile, state.dump(2) + "\n");
    if (rule_state && rule_state->slots > 0) {
      std::vector<zo2::io::TensorToWrite> tensors;
      for (std::size_t g = 0; g < rule_state->groups.size(); ++g)
        tensors.push_back({"group." + std::to_string(g), zo2::io::Dtype::F32,
                           {static_cast<std::int64_t>(rule_state->groups[g].size())}, rule_state->groups[g].data()});
      zo2::io::write_safetensors(staging / kRuleStateFile, tensors,
                                 {{"slots", std::to_string(rule_state->slots)},
                                  {"groups", std::to_string(rule_state->groups.size())}});
    }
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

std::optional<RuleState> read_rule_state(const fs::path& checkpoint) {
  const fs::path file = checkpoint / kRuleStateFile;
  if (!fs::exists(file)) return std::nullopt;
  const auto st = zo2::io::SafetensorsFile::open(file);
  const auto& meta = st.metadata();
  const auto slots = meta.find("slots"), groups = meta.find("groups");
  if (slots == meta.end() || groups == meta.end())
    throw zo2::FileError(file.string(), "no \"slots\" and \"groups\" in __metadata__");
  auto count = [&](const std::string& key, const std::string& v, unsigned long long most) {
    if (v.empty() || v.size() > 8 || v.find_first_not_of("0123456789") != std::string::npos || std::stoull(v) > most)
      throw zo2::FileError(file.string(), "__metadata__ \"" + key + "\" is not a count up to " + std::to_string(most) +
                                              ": '" + v + "'");
    return std::stoull(v);
  };
  RuleState out;
  out.slots = static_cast<unsigned>(count("slots", slots->second, 8));
  const std::size_t n = count("groups", groups->second, 1u << 20);
  for (std::size_t g = 0; g < n; ++g) {
    const std::string name = "group." + std::to_string(g);
    const auto& t = st.entry(name);
    if (t.dtype != zo2::io::Dtype::F32) throw zo2::FileError(file.string(), name + " is not F32");
    std::vector<float> v(t.bytes.size() / sizeof(float));
    if (!v.empty()) std::memcpy(v.data(), t.bytes.data(), v.size() * sizeof(float));  // (an empty one's data() may be null)
    out.groups.push_back(std::move(v));
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

// ---- state.json validation: every field a resume reads, checked for type and range -------------

namespace {

using nlohmann::json;

enum class Kind { integer, number, string, boolean, object };

struct StateField {
  const char* section;  // "" (top level), "optimizer", "train" or "train.engine"
  const char* key;
  Kind kind;
  std::uint64_t min = 0, max = 0;  // integer fields
  double min_number = -std::numeric_limits<double>::max(), max_number = std::numeric_limits<double>::max();
  bool required = false;
};

constexpr std::uint64_t kMaxU32 = 0xffffffffu;
constexpr std::uint64_t kMaxU64 = std::numeric_limits<std::uint64_t>::max();

const StateField kStateFields[] = {
    {"", "step", Kind::integer, 0, kMaxU32, 0, 0, true},  // the noise counter holds 2^32 - 1 steps
    {"", "seed", Kind::integer, 0, kMaxU64, 0, 0, true},
    {"", "skipped_steps", Kind::integer, 0, kMaxU32},  // also at most "step", checked below
    {"", "noise_scheme", Kind::integer, 0, 0x7fffffffu},
    {"", "format", Kind::string},
    {"", "tokenizer", Kind::string},
    {"", "optimizer", Kind::object},
    {"", "train", Kind::object},
    {"optimizer", "lr", Kind::number},
    {"optimizer", "eps", Kind::number},
    {"optimizer", "weight_decay", Kind::number},
    {"optimizer", "lr_schedule", Kind::string},
    {"optimizer", "warmup_steps", Kind::integer, 0, kMaxU32},
    {"optimizer", "algorithm", Kind::string},
    {"optimizer", "estimator", Kind::string},
    {"optimizer", "queries", Kind::integer, 1, 16},
    {"optimizer", "accumulate", Kind::integer, 1, 4096},
    {"optimizer", "momentum", Kind::number},
    {"optimizer", "beta1", Kind::number},
    {"optimizer", "beta2", Kind::number},
    {"optimizer", "adam_eps", Kind::number},
    {"", "updates", Kind::integer, 0, kMaxU32},  // also at most "step"
    {"train", "total_steps", Kind::integer, 0, kMaxU32},
    {"train", "batch", Kind::integer, 1, kMaxBatch},
    {"train", "seq_len", Kind::integer, 2,
     static_cast<std::uint64_t>(std::max(zo2::opt::OPTConfig::kMaxPositions, zo2::llama::LlamaConfig::kMaxPositions))},
    {"train", "eval_every", Kind::integer, 0, kMaxU64},
    {"train", "eval_limit", Kind::integer, 0, kMaxU64},
    {"train", "checkpoint_every", Kind::integer, 0, kMaxU64},
    {"train", "demo", Kind::boolean},
    {"train", "data_kind", Kind::string},
    {"train", "data", Kind::string},
    {"train", "template", Kind::string},
    {"train", "candidates", Kind::string},
    {"train", "eval_data", Kind::string},
    {"train", "checkpoint_dir", Kind::string},
    {"train", "engine", Kind::object},
    {"train.engine", "device", Kind::string},
    {"train.engine", "offload", Kind::boolean},
    {"train.engine", "codec", Kind::string},
    {"train.engine", "gpu_memory_budget_gib", Kind::number, 0, 0, 0.0, kMaxGpuMemoryBudgetGib},
    {"train.engine", "optimizer_state", Kind::string},
    {"train.engine", "description", Kind::string},
};

/// `v` as JSON text for a message, cut to a line's worth.
std::string shown(const json& v) {
  std::string text = v.dump();
  if (text.size() > 64) text = text.substr(0, 60) + " ...";
  return text;
}

/// The object at `section` ("a.b" walks nested objects), or null when it is absent.
const json* state_section(const json& state, const std::string& section) {
  const json* at = &state;
  std::size_t begin = 0;
  while (begin < section.size()) {
    const std::size_t dot = std::min(section.find('.', begin), section.size());
    const std::string key = section.substr(begin, dot - begin);
    if (!at->is_object() || !at->contains(key) || !(*at)[key].is_object()) return nullptr;
    at = &(*at)[key];
    begin = dot + 1;
  }
  return at;
}

/// Throws FileError naming `file` and the field when a field of `state` has the wrong type or
/// is out of range. A field may be absent unless it is required, and null unless it is an
/// object (a resume reads absent and null settings alike, as "not recorded").
void check_state(const json& state, const std::string& file) {
  for (const StateField& f : kStateFields) {
    const std::string name = std::string(f.section) + (*f.section ? "." : "") + f.key;
    auto fail = [&](const std::string& why) { return zo2::FileError(file, "field '" + name + "' " + why); };
    const json* section = state_section(state, f.section);
    if (!section || !section->contains(f.key) || ((*section)[f.key].is_null() && f.kind != Kind::object)) {
      if (f.required) throw fail("is missing");
      continue;
    }
    const json& v = (*section)[f.key];
    switch (f.kind) {
      case Kind::integer:
        // Only JSON integers: a float (2^70 parses as one) or a negative number is rejected
        // before anything converts it to an unsigned integer.
        if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<std::int64_t>() < 0) ||
            v.get<std::uint64_t>() < f.min || v.get<std::uint64_t>() > f.max)
          throw fail("must be an integer in [" + std::to_string(f.min) + ", " + std::to_string(f.max) + "], got " +
                     shown(v));
        break;
      case Kind::number:
        if (!v.is_number()) throw fail("must be a number, got " + shown(v));
        if (!(v.get<double>() >= f.min_number && v.get<double>() <= f.max_number)) {
          std::ostringstream os;
          os << "must be in [" << f.min_number << ", " << f.max_number << "], got " << shown(v);
          throw fail(os.str());
        }
        break;
      case Kind::string:
        if (!v.is_string()) throw fail("must be a string, got " + shown(v));
        break;
      case Kind::boolean:
        if (!v.is_boolean()) throw fail("must be true or false, got " + shown(v));
        break;
      case Kind::object:
        if (!v.is_object()) throw fail("must be an object, got " + shown(v));
        break;
    }
  }
  for (const char* key : {"skipped_steps", "updates"}) {
    const auto it = state.find(key);
    if (it != state.end() && !it->is_null() && it->get<std::uint64_t>() > state["step"].get<std::uint64_t>())
      throw zo2::FileError(file, std::string("field '") + key + "' (" + it->dump() + ") exceeds field 'step' (" +
                                     state["step"].dump() + ")");
  }
}

}  // namespace

nlohmann::json read_state(const fs::path& checkpoint) {
  const fs::path file = checkpoint / kStateFile;
  const std::string text = read_file(file);
  zo2::io::check_json_depth(text, file.string());  // a resume copies sections of it
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw zo2::FileError(file.string(), std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object() || !j.contains("step") || !j.contains("seed"))
    throw zo2::FileError(file.string(), "not a zo2-opt state file (needs \"step\" and \"seed\")");
  check_state(j, file.string());
  return j;
}

SavedProgress saved_progress(const nlohmann::json& state) {
  const auto count = [&](const char* key) -> std::optional<std::uint64_t> {
    const auto it = state.find(key);
    if (it == state.end() || it->is_null()) return std::nullopt;
    return it->get<std::uint64_t>();
  };
  SavedProgress p{state.at("step").get<std::uint64_t>(), state.at("seed").get<std::uint64_t>(),
                  count("skipped_steps").value_or(0)};
  // Checkpoints before the field counted every step that was not skipped as an update.
  p.updates = count("updates").value_or(p.step - std::min(p.step, p.skipped_steps));
  return p;
}

}  // namespace zo2_opt
