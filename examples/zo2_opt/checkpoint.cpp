#include "checkpoint.hpp"

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>

#include <unistd.h>

#include <zo2/core/error.hpp>
#include <zo2/io/json_file.hpp>
#include <zo2/io/safetensors.hpp>

#include "cli.hpp"
#include "fs_util.hpp"
#include "model_setup.hpp"

namespace zo2_opt {

namespace fs = std::filesystem;

namespace {

std::string group_name(std::size_t g) { return "group." + std::to_string(g); }

/// `v` as a count of at most `most` (decimal digits only), or a FileError naming `file` and `key`.
std::size_t metadata_count(const fs::path& file, const std::string& key, const std::string& v,
                           unsigned long long most) {
  if (v.empty() || v.size() > 8 || v.find_first_not_of("0123456789") != std::string::npos || std::stoull(v) > most)
    throw zo2::FileError(file.string(), "__metadata__ \"" + key + "\" is not a count up to " + std::to_string(most) +
                                            ": '" + v + "'");
  return static_cast<std::size_t>(std::stoull(v));
}

constexpr unsigned long long kMaxStateGroups = 1u << 20;

}  // namespace

std::optional<GroupStateSource> rule_state_source(Engine& engine) {
  const unsigned slots = engine.rule_state_slots();
  if (slots == 0) return std::nullopt;
  const zo2::ModelLayout& ml = engine.model_layout();
  GroupStateSource source;
  source.dtype = zo2::io::Dtype::F32;
  source.metadata = {{"slots", std::to_string(slots)}, {"groups", std::to_string(ml.num_groups())}};
  for (std::size_t g = 0; g < ml.num_groups(); ++g)
    source.elements.push_back(static_cast<std::size_t>(slots) * ml.layout(zo2::GroupIndex{g}).total_elements());
  source.read = [&engine](zo2::GroupIndex g, std::span<std::byte> out) {
    // F32 on disk is the host's float (little-endian hosts, as everywhere else in zo2's files).
    engine.get_rule_state_group(g, std::span<float>(reinterpret_cast<float*>(out.data()), out.size() / sizeof(float)));
  };
  return source;
}

std::optional<GroupStateSource> encoded_state_source(Engine& engine) {
  const auto codec = engine.encoded_codec();
  if (!codec) return std::nullopt;
  const zo2::ModelLayout& ml = engine.model_layout();
  GroupStateSource source;
  source.dtype = zo2::io::Dtype::U8;
  source.metadata = {{"codec", *codec}, {"groups", std::to_string(ml.num_groups())}};
  for (std::size_t g = 0; g < ml.num_groups(); ++g) source.elements.push_back(engine.encoded_group_bytes(zo2::GroupIndex{g}));
  source.read = [&engine](zo2::GroupIndex g, std::span<std::byte> out) {
    engine.get_encoded_group(g, std::span<unsigned char>(reinterpret_cast<unsigned char*>(out.data()), out.size()));
  };
  return source;
}

void write_group_state(const fs::path& file, const GroupStateSource& source) {
  std::vector<zo2::io::TensorHeader> headers;
  for (std::size_t g = 0; g < source.elements.size(); ++g)
    headers.push_back({group_name(g), source.dtype, {static_cast<std::int64_t>(source.elements[g])}});
  // The streaming writer names its single shard model.safetensors: it writes into a sibling
  // directory of its own, and the finished (fsync'ed) file is renamed to `file`.
  const fs::path parts = file.parent_path() / ("." + file.filename().string() + ".parts." + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(parts, ec);
  fs::create_directories(parts);
  try {
    zo2::io::ShardedSafetensorsWriter writer(parts, std::move(headers), std::numeric_limits<std::uint64_t>::max(),
                                             source.metadata);
    std::vector<std::byte> buffer;  // one group at a time
    for (std::size_t g = 0; g < source.elements.size(); ++g) {
      buffer.resize(source.elements[g] * zo2::io::dtype_size(source.dtype));
      if (!buffer.empty()) source.read(zo2::GroupIndex{g}, buffer);
      writer.write(group_name(g), buffer);
    }
    writer.finish();
    fs::rename(parts / zo2::io::SafetensorsCheckpoint::kSingleFileName, file);
    fs::remove_all(parts);
  } catch (...) {
    fs::remove_all(parts, ec);
    throw;
  }
  fsync_path(file.parent_path().empty() ? fs::path(".") : file.parent_path());
}

fs::path save_checkpoint(const fs::path& checkpoint_dir, std::uint64_t step, const ModelConfig& config,
                         const zo2::ModelLayout& layout, const GroupReader& read_group, const Tokenizer* tokenizer,
                         const nlohmann::json& state, const GroupStateSource* encoded,
                         const GroupStateSource* rule_state) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08llu", static_cast<unsigned long long>(step));
  const fs::path target = checkpoint_dir / name;
  export_model(target, config, layout, read_group, tokenizer, [&](const fs::path& staging) {
    write_file_synced(staging / kStateFile, state.dump(2) + "\n");
    if (rule_state) write_group_state(staging / kRuleStateFile, *rule_state);
    if (encoded) write_group_state(staging / kEncodedStateFile, *encoded);
  });
  return target;
}

// ---- reading the per-group state files ------------------------------------------------------

std::optional<GroupStateFile> GroupStateFile::open(const fs::path& file, const char* key, zo2::io::Dtype dtype,
                                                   std::string& value) {
  if (!fs::exists(file)) return std::nullopt;
  GroupStateFile out(file, zo2::io::SafetensorsFile::open(file));
  const auto& meta = out.file_.metadata();
  const auto found = meta.find(key), groups = meta.find("groups");
  if (found == meta.end() || groups == meta.end())
    throw zo2::FileError(file.string(), "no \"" + std::string(key) + "\" and \"groups\" in __metadata__");
  value = found->second;
  out.groups_ = metadata_count(file, "groups", groups->second, kMaxStateGroups);
  out.check_groups(dtype);
  return out;
}

std::optional<GroupStateFile> GroupStateFile::open_rule_state(const fs::path& checkpoint) {
  const fs::path file = checkpoint / kRuleStateFile;
  std::string slots;
  auto out = open(file, "slots", zo2::io::Dtype::F32, slots);
  if (out) out->slots_ = static_cast<unsigned>(metadata_count(file, "slots", slots, 8));
  return out;
}

std::optional<GroupStateFile> GroupStateFile::open_encoded_state(const fs::path& checkpoint) {
  std::string codec;
  auto out = open(checkpoint / kEncodedStateFile, "codec", zo2::io::Dtype::U8, codec);
  if (out) out->codec_ = std::move(codec);
  return out;
}

void GroupStateFile::check_groups(zo2::io::Dtype dtype) {
  for (std::size_t g = 0; g < groups_; ++g) {
    const std::string name = group_name(g);
    const auto& t = file_.entry(name);  // FileError naming the file and the tensor when absent
    if (t.dtype != dtype)
      throw zo2::FileError(path_.string(), name + " is not " + std::string(zo2::io::dtype_name(dtype)));
  }
}

std::size_t GroupStateFile::group_bytes(std::size_t g) const {
  if (g >= groups_)
    throw zo2::FileError(path_.string(), "group " + std::to_string(g) + " of " + std::to_string(groups_) + " asked for");
  return file_.entry(group_name(g)).bytes.size();
}

void GroupStateFile::read_group(std::size_t g, std::span<std::byte> out) const {
  const std::size_t n = group_bytes(g);
  if (out.size() != n)
    throw zo2::ShapeError(path_.string() + ": group " + std::to_string(g) + " has " + std::to_string(n) +
                          " bytes, the buffer " + std::to_string(out.size()));
  const std::string name = group_name(g);
  if (n) std::memcpy(out.data(), file_.entry(name).bytes.data(), n);  // (an empty one's data() may be null)
  file_.release(name);
}

void restore_rule_state(Engine& engine, const GroupStateFile& file) {
  const zo2::ModelLayout& ml = engine.model_layout();
  const unsigned slots = engine.rule_state_slots();
  if (file.slots() != slots || file.groups() != ml.num_groups())
    throw zo2::Error("the saved optimizer state has " + std::to_string(file.slots()) + " values per weight in " +
                     std::to_string(file.groups()) + " groups; this run's optimizer keeps " + std::to_string(slots) +
                     " in " + std::to_string(ml.num_groups()) + " (another --optimizer or model?)");
  if (slots == 0) return;
  auto size_of = [&](std::size_t g) {
    return static_cast<std::size_t>(slots) * ml.layout(zo2::GroupIndex{g}).total_elements();
  };
  for (std::size_t g = 0; g < file.groups(); ++g)
    if (file.group_bytes(g) != size_of(g) * sizeof(float))
      throw zo2::Error("the saved optimizer state of group " + std::to_string(g) + " has " +
                       std::to_string(file.group_bytes(g) / sizeof(float)) + " values, this model " +
                       std::to_string(size_of(g)));
  std::vector<float> buffer;  // one group at a time
  for (std::size_t g = 0; g < file.groups(); ++g) {
    if (!engine.sets_group(zo2::GroupIndex{g})) continue;  // the host's seat 0 sets it
    buffer.resize(size_of(g));
    file.read_group(g, std::as_writable_bytes(std::span<float>(buffer)));
    engine.set_rule_state_group(zo2::GroupIndex{g}, buffer);
  }
}

void restore_encoded_state(Engine& engine, const GroupStateFile& file) {
  const zo2::ModelLayout& ml = engine.model_layout();
  const auto codec = engine.encoded_codec();
  if (!codec) throw zo2::Error("this engine cannot restore encoded state of codec '" + file.codec() + "'");
  bool fits = file.codec() == *codec && file.groups() == ml.num_groups();
  for (std::size_t g = 0; fits && g < file.groups(); ++g)
    fits = file.group_bytes(g) == engine.encoded_group_bytes(zo2::GroupIndex{g});
  if (!fits)
    throw zo2::Error("encoded state of codec '" + file.codec() + "' with " + std::to_string(file.groups()) +
                     " groups does not fit this run (codec " + *codec + ", " + std::to_string(ml.num_groups()) +
                     " groups)");
  std::vector<unsigned char> buffer;  // one group at a time
  for (std::size_t g = 0; g < file.groups(); ++g) {
    if (!engine.sets_group(zo2::GroupIndex{g})) continue;  // the host's seat 0 sets it
    buffer.resize(file.group_bytes(g));
    file.read_group(g, std::as_writable_bytes(std::span<unsigned char>(buffer)));
    engine.set_encoded_group(zo2::GroupIndex{g}, buffer);
  }
}

std::optional<EncodedState> read_encoded_state(const fs::path& checkpoint) {
  const auto file = GroupStateFile::open_encoded_state(checkpoint);
  if (!file) return std::nullopt;
  EncodedState out{file->codec(), {}};
  for (std::size_t g = 0; g < file->groups(); ++g) {
    std::vector<unsigned char> bytes(file->group_bytes(g));
    file->read_group(g, std::as_writable_bytes(std::span<unsigned char>(bytes)));
    out.groups.push_back(std::move(bytes));
  }
  return out;
}

std::optional<RuleState> read_rule_state(const fs::path& checkpoint) {
  const auto file = GroupStateFile::open_rule_state(checkpoint);
  if (!file) return std::nullopt;
  RuleState out;
  out.slots = file->slots();
  for (std::size_t g = 0; g < file->groups(); ++g) {
    std::vector<float> v(file->group_bytes(g) / sizeof(float));
    if (v.size() * sizeof(float) != file->group_bytes(g))
      throw zo2::FileError(file->path().string(), group_name(g) + " is not a whole number of F32 values");
    file->read_group(g, std::as_writable_bytes(std::span<float>(v)));
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
  nlohmann::json j = zo2::io::read_json_file(file);  // depth-checked: a resume copies sections of it
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
