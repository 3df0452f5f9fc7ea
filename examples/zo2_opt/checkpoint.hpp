// zo2-opt: training checkpoints. A checkpoint is a directory
//   <checkpoint-dir>/step-00000100/{config.json, model.safetensors, tokenizer files, state.json}
// that is itself an HF-loadable model directory of the run's family (the tokenizer files:
// vocab.json + merges.txt, or tokenizer.json and its companions, as the run's tokenizer came); state.json adds what a bit-exact resume needs
// (step, seed, optimizer config, data and batch settings). It is written into a temporary
// directory, every file fsync'ed, then renamed into place: a crash leaves the old checkpoint or
// the new one, never half of one. The optimizer is flush()ed first, so the weights are theta at
// that step with no update owed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>

#include <nlohmann/json.hpp>

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

/// `encoded` (optional) is written as kEncodedStateFile beside the weights, `rule_state` (when
/// it has slots) as kRuleStateFile.
/// The weights come group by group from `read_group` (Engine::group_reader()), so a checkpoint
/// never holds a second copy of the model: one group's floats at a time.
std::filesystem::path save_checkpoint(const std::filesystem::path& checkpoint_dir, std::uint64_t step,
                                      const ModelConfig& config, const zo2::ModelLayout& layout,
                                      const GroupReader& read_group, const Tokenizer* tokenizer,
                                      const nlohmann::json& state, const EncodedState* encoded = nullptr,
                                      const RuleState* rule_state = nullptr);

/// The checkpoint's kRuleStateFile, or nullopt when it has none.
std::optional<RuleState> read_rule_state(const std::filesystem::path& checkpoint);

/// The checkpoint's kEncodedStateFile, or nullopt when it has none.
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
