// zo2-opt: training checkpoints. A checkpoint is a directory
//   <checkpoint-dir>/step-00000100/{config.json, model.safetensors, tokenizer files, state.json}
// that is itself an HF-loadable model directory of the run's family (the tokenizer files:
// vocab.json + merges.txt, or tokenizer.json and its companions, as the run's tokenizer came); state.json adds what a bit-exact resume needs
// (step, seed, optimizer config, data and batch settings). It is written into a temporary
// directory, every file fsync'ed, then renamed into place: a crash leaves the old checkpoint or
// the new one, never half of one. The optimizer is flush()ed first, so the weights are theta at
// that step with no update owed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/io/safetensors.hpp>
#include <zo2/optim/parameter_store.hpp>

#include "engine.hpp"
#include "model_config.hpp"
#include "model_setup.hpp"
#include "tokenizer.hpp"

namespace zo2_opt {

inline constexpr const char* kStateFile = "state.json";
/// The offload engine's encoded masters, where the float weights would not restore them exactly
/// (the int8 codec): one U8 tensor "group.<g>" per parameter group, the codec in the metadata.
inline constexpr const char* kEncodedStateFile = "offload_state.safetensors";

/// A stateful optimizer's per-element state (zo-mmt, zo-adam): one F32 tensor "group.<g>" per
/// parameter group, the slot count in the metadata.
inline constexpr const char* kRuleStateFile = "optimizer_state.safetensors";

/// A checkpoint's per-group state file (kEncodedStateFile, kRuleStateFile) as it is produced:
/// tensor "group.<g>" of `dtype` and elements[g] elements, 1-D, in group order, `metadata` in
/// the header. `read` fills group g's bytes (elements[g] x the dtype's size) when the file
/// writes it: one group is in memory at a time, never the whole model's state.
struct GroupStateSource {
  zo2::io::Dtype dtype{};
  std::map<std::string, std::string> metadata;
  std::vector<std::size_t> elements;
  std::function<void(zo2::GroupIndex, std::span<std::byte>)> read;
};

/// The engine's rule state (zo-mmt, zo-adam) as a source for kRuleStateFile: F32, metadata
/// "slots" and "groups"; nullopt when the rule keeps none.
std::optional<GroupStateSource> rule_state_source(Engine& engine);
/// The engine's encoded masters as a source for kEncodedStateFile: U8, metadata "codec" and
/// "groups"; nullopt when its float parameters restore it exactly (Engine::encoded_codec()).
std::optional<GroupStateSource> encoded_state_source(Engine& engine);

/// Writes `source` into `file`, one group at a time, through the streaming safetensors writer
/// (io::ShardedSafetensorsWriter, one shard): the same bytes io::write_safetensors writes from
/// the whole state. The file is complete and fsync'ed when this returns; it goes through a
/// temporary sibling directory, so `file` is never seen half written.
void write_group_state(const std::filesystem::path& file, const GroupStateSource& source);

/// `encoded` (optional) is written as kEncodedStateFile beside the weights, `rule_state`
/// (optional) as kRuleStateFile, each one group at a time (write_group_state).
/// The weights come group by group from `read_group` (Engine::group_reader()), so a checkpoint
/// never holds a second copy of the model: one group's floats (or state) at a time.
std::filesystem::path save_checkpoint(const std::filesystem::path& checkpoint_dir, std::uint64_t step,
                                      const ModelConfig& config, const zo2::ModelLayout& layout,
                                      const GroupReader& read_group, const Tokenizer* tokenizer,
                                      const nlohmann::json& state, const GroupStateSource* encoded = nullptr,
                                      const GroupStateSource* rule_state = nullptr);

/// A checkpoint's per-group state file, memory-mapped, its header and metadata checked when
/// it is opened (every "group.<g>" present, of the file's dtype); read_group() copies one
/// group's bytes and drops its pages from the resident set, so a resume holds one group of it.
class GroupStateFile {
 public:
  /// The checkpoint's kRuleStateFile (F32; "slots" up to 8, "groups" in the metadata), or
  /// nullopt when it has none.
  static std::optional<GroupStateFile> open_rule_state(const std::filesystem::path& checkpoint);
  /// The checkpoint's kEncodedStateFile (U8; "codec", "groups" in the metadata), or nullopt.
  static std::optional<GroupStateFile> open_encoded_state(const std::filesystem::path& checkpoint);

  const std::filesystem::path& path() const noexcept { return path_; }
  std::size_t groups() const noexcept { return groups_; }
  /// kRuleStateFile: values per weight; 0 for kEncodedStateFile.
  unsigned slots() const noexcept { return slots_; }
  /// kEncodedStateFile: the codec's name; empty for kRuleStateFile.
  const std::string& codec() const noexcept { return codec_; }
  /// Bytes of group g.
  std::size_t group_bytes(std::size_t g) const;
  /// Copies group g's bytes into `out` (group_bytes(g) of them), then releases its pages.
  void read_group(std::size_t g, std::span<std::byte> out) const;

 private:
  GroupStateFile(std::filesystem::path path, zo2::io::SafetensorsFile file)
      : path_(std::move(path)), file_(std::move(file)) {}
  /// `file` (nullopt when absent) with its "groups" and `key` (into `value`) read from the
  /// metadata and every group checked to be `dtype`.
  static std::optional<GroupStateFile> open(const std::filesystem::path& file, const char* key, zo2::io::Dtype dtype,
                                            std::string& value);
  void check_groups(zo2::io::Dtype dtype);

  std::filesystem::path path_;
  zo2::io::SafetensorsFile file_;
  std::size_t groups_ = 0;
  unsigned slots_ = 0;
  std::string codec_;
};

/// Restores the engine's rule state from `file` group by group; the slot count, group count
/// and every group's size are checked against the engine before any group is set.
void restore_rule_state(Engine& engine, const GroupStateFile& file);
/// Restores the engine's encoded masters from `file` group by group; the codec, group count
/// and every group's size are checked before any group is set.
void restore_encoded_state(Engine& engine, const GroupStateFile& file);

/// The checkpoint's kRuleStateFile as a whole, or nullopt when it has none (tests, tools: a
/// resume streams it with GroupStateFile).
std::optional<RuleState> read_rule_state(const std::filesystem::path& checkpoint);

/// The checkpoint's kEncodedStateFile as a whole, or nullopt when it has none.
std::optional<EncodedState> read_encoded_state(const std::filesystem::path& checkpoint);

/// `dir` itself when it holds state.json, else its newest step-* subdirectory that does.
std::filesystem::path find_checkpoint(const std::filesystem::path& dir);

/// A model directory for eval/generate: `dir` when it holds config.json, else the newest
/// checkpoint in it, else `dir` (whose loading then names the missing file).
std::filesystem::path resolve_model_dir(const std::filesystem::path& dir);

/// The checkpoint's state.json, parsed and checked: every field a resume reads has its type
/// and range (integers: non-negative, no floats, bounded), or a FileError names the file and the
/// field.
nlohmann::json read_state(const std::filesystem::path& checkpoint);

/// Where a run stood when it saved `state` (a read_state() result): the next step, the seed,
/// the steps skipped so far (0 when the checkpoint does not record them) and the updates
/// scheduled (zo-adam's bias-correction count; steps - skipped when not recorded).
struct SavedProgress {
  std::uint64_t step = 0;
  std::uint64_t seed = 0;
  std::uint64_t skipped_steps = 0;
  std::uint64_t updates = 0;
};
SavedProgress saved_progress(const nlohmann::json& state);

}  // namespace zo2_opt
