// zo2-opt: a model, its parameters and a MeZO-SGD optimizer on one device. The commands (train,
// eval, generate) talk to this interface only; engine_cpu.cpp implements it with the family's CPU
// reference model and the Resident policy, engine_cuda.cu with its CUDA model. Both are templates
// over the model family (OPT, LLaMA), instantiated once per family.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <zo2/core/config.hpp>
#include <zo2/core/error.hpp>
#include <zo2/models/llama/config.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>
#include <zo2/optim/zo_optimizer.hpp>

#include "data.hpp"
#include "model_config.hpp"
#include "model_setup.hpp"

namespace zo2_opt {

/// The offload engine's masters in its codec's format, one byte string per parameter group:
/// what a checkpoint adds when the float parameters alone would not restore the run exactly
/// (the int8 codec, whose row scales are sticky). A whole-model copy: the checkpoint code reads
/// and writes it group by group (Engine::get_encoded_group); this is read_encoded_state()'s
/// result only.
struct EncodedState {
  std::string codec;
  std::vector<std::vector<unsigned char>> groups;
};

/// Per-element optimizer state of a stateful rule (zo-mmt's momentum, zo-adam's moments): the
/// policy's get_rule_state() of each parameter group, `slots` arrays of the group's flat size.
/// A whole-model copy, as EncodedState: read_rule_state()'s result only.
struct RuleState {
  unsigned slots = 0;
  std::vector<std::vector<float>> groups;
};

struct EngineOptions {
  std::string device = "cpu";  // "cpu" | "cuda"
  std::string compute = "fp32";  // cuda: the forward's precision, "fp32" | "bf16" (the master stays fp32 or the codec's)
  bool offload = false;
  std::string codec;                    // offload codec name; empty: the default
  std::optional<double> gpu_memory_budget_gib;
  unsigned writeback_every = 1;  // offload: write a streamed block back every K steps (0: K from the measured link)
  bool state_bf16 = false;       // offload: zo-mmt's / zo-adam's state in bf16 (OffloadOptions::rule_state_bf16)
  std::size_t slots = 2;  // offload: device slots the streamed blocks pass through (OffloadOptions::slots)
  bool two_perturbed_copies = false;  // offload: theta + eps z and theta - eps z on the GPU at once (OffloadOptions::one_perturbed_copy = false)
  /// offload under mpirun: this host's ranks hold one pinned host master in POSIX shared memory
  /// (zo2::gpu::SharedHostMaster across processes); seat 0 (the host's first rank) creates it.
  struct SharedMaster {
    std::string name;  // the shared memory's name, the same on every rank of the host
    std::size_t seat = 0, seats = 1;
    double wait_s = 300;  // how long a rank waits for another's part of a block before it gives up
  };
  std::optional<SharedMaster> shared_master;
  zo2::ZOConfig zo;
  std::uint64_t start_step = 0;
  /// Print a line to stderr every few seconds while the weights load (a large model's start-up).
  bool report_load_progress = false;
};

class Engine {
 public:
  virtual ~Engine() = default;
  /// One optimizer step.
  virtual zo2::StepResult step(const TokenBatch& batch) = 0;
  /// One step over micro-batches that share the step's z (gradient accumulation): the losses are
  /// their scored-token-weighted means.
  virtual zo2::StepResult step_accumulated(std::span<const TokenBatch> micro) = 0;
  /// Continues a saved run's counters (skipped steps, update count); the step is start_step.
  virtual void restore_progress(const zo2::OptimizerState& saved) = 0;
  /// Values per weight the rule keeps (zo-mmt 1, zo-adam 2); 0 when it keeps none.
  virtual unsigned rule_state_slots() const = 0;
  /// Group g's rule state (flushes first): rule_state_slots() x the group's flat size floats.
  /// A checkpoint reads it one group at a time, so it never holds the whole model's state.
  virtual void get_rule_state_group(zo2::GroupIndex g, std::span<float> out) = 0;
  /// Restores group g's get_rule_state_group() saved by a run with the same rule and model.
  virtual void set_rule_state_group(zo2::GroupIndex g, std::span<const float> in) = 0;
  /// Whether group g's values (parameters, rule state, codes) are this engine's to set: false for
  /// the streamed groups of a rank that shares its host master and is not its seat 0 (seat 0 sets
  /// them for every rank of the host).
  virtual bool sets_group(zo2::GroupIndex) const { return true; }
  /// Every rank has built its engine (after a barrier): a host master shared in POSIX shared
  /// memory loses its name, so a crash from here on leaves nothing in /dev/shm.
  virtual void every_rank_ready() {}
  /// A host master shared with other ranks: how long a rank waits for another's part of a block
  /// before it gives up with an error (the step's timeout; longer while rank 0 writes a checkpoint).
  virtual void set_partner_wait(double /*seconds*/) {}
  /// A line for the run's log that the engine has to say once (e.g. the write-back interval it
  /// chose after measuring a step); nullopt when it has nothing new.
  virtual std::optional<std::string> take_notice() { return std::nullopt; }
  /// Where building the engine spent its time (e.g. "2.1 s allocating ..., 9.8 s drawing or
  /// reading the weights, 3.0 s encoding them"); empty when it does not say.
  virtual std::string load_report() const { return {}; }
  /// Mean token loss at theta (flushes the owed update first).
  virtual double loss(const TokenBatch& batch) = 0;
  /// Logits of every position of a single sequence, [ids.size(), vocab] row-major, at theta.
  virtual std::vector<float> logits(std::span<const std::int32_t> ids) = 0;
  /// Logits of the last position.
  std::vector<float> next_token_logits(std::span<const std::int32_t> ids, std::size_t vocab) {
    std::vector<float> all = logits(ids);
    return std::vector<float>(all.end() - static_cast<std::ptrdiff_t>(vocab), all.end());
  }
  /// MeZO's classification scores: sum of log p(candidate tokens | prompt), at theta.
  virtual std::vector<double> score_candidates(std::span<const std::int32_t> prompt,
                                               const std::vector<std::vector<std::int32_t>>& candidates) = 0;
  /// Applies the owed update; after it, parameters() is theta.
  virtual void flush() = 0;
  /// The parameter groups (what read_group hands out).
  virtual const zo2::ModelLayout& model_layout() const = 0;
  /// theta of group g as float, padding included, into `flat` (flushes first; on a device,
  /// downloads or decodes that group alone): checkpoints and exports read the parameters one
  /// group at a time, so no engine ever needs a second whole copy of them.
  virtual void read_group(zo2::GroupIndex g, std::span<float> flat) = 0;
  /// read_group as an export's GroupReader (valid while the engine lives).
  GroupReader group_reader() {
    return [this](zo2::GroupIndex g, std::span<float> flat) { read_group(g, flat); };
  }
  /// Bytes of host memory the parameters rest in between steps, when an offloading engine keeps
  /// them there in its codec's format (the pinned masters); nullopt otherwise.
  virtual std::optional<std::size_t> host_parameter_bytes() const { return std::nullopt; }
  virtual zo2::OptimizerState state() const = 0;
  virtual std::string device_description() const = 0;
  /// The codec whose encoded masters a checkpoint keeps because the float parameters would not
  /// restore this engine exactly (the int8 codec's sticky row scales); nullopt otherwise.
  virtual std::optional<std::string> encoded_codec() const { return std::nullopt; }
  /// Bytes of group g's encoded masters (encoded_codec() engines).
  virtual std::size_t encoded_group_bytes(zo2::GroupIndex g) const {
    throw zo2::Error("this engine keeps no encoded masters (group " + std::to_string(g.value) + ")");
  }
  /// Group g's encoded masters, encoded_group_bytes(g) of them (flushes first).
  virtual void get_encoded_group(zo2::GroupIndex g, std::span<unsigned char> out) {
    (void)out;
    throw zo2::Error("this engine keeps no encoded masters (group " + std::to_string(g.value) + ")");
  }
  /// Restores group g's get_encoded_group() saved by an engine of the same codec and model.
  virtual void set_encoded_group(zo2::GroupIndex g, std::span<const unsigned char> in) {
    (void)in;
    throw zo2::Error("this engine cannot restore encoded masters (group " + std::to_string(g.value) + ")");
  }
  /// Bytes of device memory in use, when there is a device.
  virtual std::optional<std::size_t> device_memory_used() const { return std::nullopt; }
  /// Weights the storage has lost since the start: the packed bf16 codec flushes a value to
  /// zero when its tensor's escape list is full (HostOffload::escape_overflow). 0 for every
  /// other engine.
  virtual std::uint64_t values_lost() const { return 0; }
  /// Data-parallel training: each step's scalars are summed over `comm`'s ranks
  /// (zo2::ZOOptimizer::set_communicator); null: one process.
  virtual void set_communicator(zo2::Communicator* comm, zo2::DataParallel mode) {
    (void)mode;
    if (comm) throw zo2::Error("this engine cannot train data-parallel");
  }
};

/// Throws the UsageError make_cpu_engine would for `options` (before a store is built for it).
void check_cpu_engine_options(const EngineOptions& options);
/// The family's CPU model (OPTModel<float> or LlamaModel<float>) with the Resident policy.
std::unique_ptr<Engine> make_cpu_engine(const ModelConfig& config, zo2::ParameterStore<float> store,
                                        const EngineOptions& options);
/// Defined in engine_cuda.cu in CUDA builds (OPTCudaModel<float>, LlamaCudaModel<float>); otherwise
/// throws "built without CUDA". The parameters go to the device (resident) or into the offload
/// engine's host store (offload) one group at a time: the engine keeps no fp32 copy of the model.
std::unique_ptr<Engine> make_cuda_engine(const zo2::opt::OPTConfig& config, const ParameterSource& parameters,
                                         const EngineOptions& options);
std::unique_ptr<Engine> make_cuda_engine(const zo2::llama::LlamaConfig& config, const ParameterSource& parameters,
                                         const EngineOptions& options);
bool cuda_built();

/// The engine `options` asks for, its parameters taken from `parameters` (which may be released
/// once this returns).
inline std::unique_ptr<Engine> make_engine(const ModelConfig& config, const ParameterSource& parameters,
                                           const EngineOptions& options) {
  if (options.device == "cuda")
    return config.visit([&](const auto& c) { return make_cuda_engine(c, parameters, options); });
  check_cpu_engine_options(options);
  return make_cpu_engine(config, parameters.take_store(), options);
}

}  // namespace zo2_opt
