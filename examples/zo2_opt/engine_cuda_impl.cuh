// The CUDA engine of zo2-opt, as templates: CudaEngine<Model, Policy> (the family's CUDA model,
// OPTCudaModel<T> or LlamaCudaModel<T>, with the weights on the GPU, zo2::gpu::CudaResident, or
// streamed from host memory, zo2::gpu::HostOffload, ZO2's offload engine, with --offload) and the
// functions that build one for a family and a forward precision T (--compute: float, or bfloat16
// on the tensor cores). engine_cuda_fp32.cu and engine_cuda_bf16.cu instantiate them, one
// precision each (they compile in parallel); engine_cuda.cu picks one from EngineOptions::compute.
// Everything the model enqueues runs on the policy's stream.
//
// Training, evaluation and generation all run under either policy: evaluation and logits take
// every group through the policy's current() in order (a streamed block passes through a slot,
// unperturbed, and is not written back), so a model larger than the GPU is evaluated and sampled
// as it is trained. One device Batch is refilled for every call (no allocation once it is as
// large as the largest batch so far).
//
// Precision: the master (the parameters the updates apply to) is fp32 on the device when
// resident (CudaResident<float, T>), the codec's format when offloaded; only the perturbed copies
// the forward reads, and the forward itself, are in T. So --compute bf16 changes the losses (and
// hence the projected gradients) by bf16 rounding, not how the parameters are kept.
//
// Host memory: the parameters come group by group from a ParameterSource (a
// memory-mapped checkpoint or the random initialisation) and go straight to the device
// (resident) or, encoded, into the offload engine's host store; checkpoints and exports read
// them back one group at a time (read_group). The engine keeps no fp32 copy of the model, so an
// offloaded run's host memory is the codec's bytes plus a few groups.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <zo2/zo2.hpp>
#include <zo2/models/llama/cuda/llama_cuda_model.cuh>
#include <zo2/models/lm_head.hpp>
#include <zo2/models/opt/cuda/opt_cuda_model.cuh>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/packed_bf16.hpp>
#include <zo2/offload/cuda_resident.cuh>
#include <zo2/offload/host_offload.cuh>
#include <zo2/offload/shared_host_master.cuh>
#include <zo2/offload/link_probe.cuh>
#include <zo2/offload/writeback_trial.hpp>

#include "cli.hpp"
#include "engine.hpp"
#include "engine_rule_state.hpp"
#include "options.hpp"

namespace zo2_opt::cuda_engine {

template <class P>
struct is_cuda_resident : std::false_type {};
template <class S, class T>
struct is_cuda_resident<zo2::gpu::CudaResident<S, T>> : std::true_type {};
template <class P>
inline constexpr bool is_cuda_resident_v = is_cuda_resident<P>::value;

/// --compute's name of the forward's precision T.
template <class T>
const char* compute_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  else if constexpr (std::is_same_v<T, zo2::bfloat16>) return "bf16";
  else static_assert(!sizeof(T), "zo2-opt computes in fp32 or bf16");
}

template <class Model, class Policy>
class CudaEngine final : public Engine {
  // Without it a stateful rule's state would silently be left out of checkpoints.
  static_assert(PolicyWithRuleState<Policy>);
  /// Whether float parameters alone would not restore the policy exactly (row-scaled codecs).
  static constexpr bool kSticky = [] {
    if constexpr (requires { Policy::codec_type::row_scaled; }) return Policy::codec_type::row_scaled;
    else return false;
  }();

 public:
  static constexpr bool kOffload = !is_cuda_resident_v<Policy>;

  template <class Config, class... PolicyArgs>
  CudaEngine(const Config& config, const ParameterSource& parameters, const EngineOptions& options,
             std::string description, PolicyArgs&&... policy_args)
      : model_(config), policy_(parameters.model_layout(), std::forward<PolicyArgs>(policy_args)...),
        optimizer_((model_.set_stream(policy_.stream()), model_), policy_, options.zo, options.start_step),
        description_(std::move(description)) {
    const double allocate_s = seconds_since(started_);
    load_parameters(parameters, options.report_load_progress);
    char report[256];
    if constexpr (kOffload)
      std::snprintf(report, sizeof report, "%.1f s allocating (model, plan, %.1f GB of pinned host memory), %s",
                    allocate_s, static_cast<double>(policy_.owned_pinned_bytes()) / 1e9, loaded_report_.c_str());
    else
      std::snprintf(report, sizeof report, "%.1f s allocating (model, device memory), %s", allocate_s,
                    loaded_report_.c_str());
    load_report_ = report;
    // The offload plan, as the budget decided it: what streams, through how many slots.
    if constexpr (requires { policy_.plan().slots; }) {
      const auto& plan = policy_.plan();
      description_ += plan.streamed_blocks == 0
                          ? ", all " + std::to_string(plan.resident_blocks) + " blocks resident"
                          : ", " + std::to_string(plan.streamed_blocks) + " blocks streamed through " +
                                std::to_string(plan.slots) + " slots, " + std::to_string(plan.resident_blocks) +
                                " resident";
    }
  }

  zo2::StepResult step(const TokenBatch& batch) override {
    model_.upload_batch(batch, batch_);
    before_step();
    const zo2::StepResult r = optimizer_.step(batch_);
    after_step();
    return r;
  }
  /// Every micro-batch is on the device at once (token ids only; activations are one batch's).
  zo2::StepResult step_accumulated(std::span<const TokenBatch> micro) override {
    if (micro_.size() < micro.size()) micro_.resize(micro.size());
    for (std::size_t i = 0; i < micro.size(); ++i) model_.upload_batch(micro[i], micro_[i]);
    before_step();
    const zo2::StepResult r =
        optimizer_.step_accumulated(std::span<const typename Model::Batch>(micro_.data(), micro.size()));
    after_step();
    return r;
  }
  /// --writeback-every 0: K is chosen by timing training steps at K = 1, 2, 4, 8
  /// (zo2::offload::WritebackTrial; the parameters are the same for every K), from the second
  /// step on (the first warms the GEMMs up). `link` is reported with the choice. The policy
  /// records a timeline for the second step.
  void choose_writeback_by_trial(zo2::offload::LinkHint link) {
    if constexpr (kOffload) {
      trial_.emplace();
      link_ = link;
    }
  }
  std::optional<std::string> take_notice() override { return std::exchange(notice_, std::nullopt); }
  std::string load_report() const override { return load_report_; }
  void restore_progress(const zo2::OptimizerState& saved) override { optimizer_.restore(saved); }
  void every_rank_ready() override {
    if constexpr (kOffload) policy_.remove_shared_master_name();
  }
  void set_partner_wait(double seconds) override {
    if constexpr (kOffload) policy_.set_shared_master_wait(std::chrono::milliseconds(static_cast<long long>(seconds * 1e3)));
  }
  bool sets_group(zo2::GroupIndex g) const override {
    if constexpr (kOffload) return policy_.sets_group(g);
    else return true;
  }
  unsigned rule_state_slots() const override { return policy_rule_state_slots(policy_); }
  void get_rule_state_group(zo2::GroupIndex g, std::span<float> out) override {
    optimizer_.flush();
    policy_get_rule_state(policy_, g, out);
  }
  void set_rule_state_group(zo2::GroupIndex g, std::span<const float> in) override {
    policy_set_rule_state(policy_, g, in);
  }
  double loss(const TokenBatch& batch) override {
    model_.upload_batch(batch, batch_);
    return optimizer_.evaluate(batch_);
  }

  /// The forward at theta group by group (prologue, blocks, epilogue through current()), then
  /// the LM head over every position.
  std::vector<float> logits(std::span<const std::int32_t> ids) override {
    optimizer_.flush();
    TokenBatch b;
    b.batch = 1;
    b.seq = ids.size();
    b.input_ids.assign(ids.begin(), ids.end());
    model_.upload_batch(b, batch_);
    const auto& ml = policy_.model_layout();
    // The prologue's view stays valid until the epilogue (the tied LM head reads it).
    const auto prologue = policy_.current(ml.prologue());
    std::size_t cur = 0;
    model_.prologue(prologue, batch_, hidden_[cur], workspace_);
    for (std::size_t i = 0; i < ml.num_blocks(); ++i) {
      model_.forward_block(i, policy_.current(ml.block(i)), hidden_[cur], hidden_[1 - cur], workspace_);
      cur = 1 - cur;
    }
    return model_.output_logits(policy_.current(ml.epilogue()), prologue, hidden_[cur], workspace_);
  }

  /// Sum of log p over each candidate's tokens, from the loss of a batch whose only targets are
  /// that candidate's tokens (mean loss x token count = -sum log p).
  std::vector<double> score_candidates(std::span<const std::int32_t> prompt,
                                       const std::vector<std::vector<std::int32_t>>& candidates) override {
    std::vector<double> scores;
    for (const auto& c : candidates) {
      TokenBatch b;
      b.batch = 1;
      b.seq = prompt.size() + c.size();
      b.input_ids.assign(prompt.begin(), prompt.end());
      b.input_ids.insert(b.input_ids.end(), c.begin(), c.end());
      b.attention_mask.assign(b.seq, 1);
      b.labels.assign(prompt.size(), kIgnore);
      b.labels.insert(b.labels.end(), c.begin(), c.end());
      scores.push_back(-loss(b) * static_cast<double>(c.size()));
    }
    return scores;
  }

  void flush() override { optimizer_.flush(); }
  const zo2::ModelLayout& model_layout() const override { return policy_.model_layout(); }
  void read_group(zo2::GroupIndex g, std::span<float> flat) override {
    optimizer_.flush();
    const std::size_t n = policy_.model_layout().layout(g).total_elements();
    if (flat.size() != n)
      throw zo2::ShapeError("read_group: group " + std::to_string(g.value) + " has " + std::to_string(n) +
                            " elements, the buffer " + std::to_string(flat.size()));
    if constexpr (kOffload) {
      policy_.get_group(g, flat);  // decodes that group alone (settling a lagging write-back first)
    } else {
      if (n) zo2::gpu::copy_to_host(flat.data(), policy_.master(g).data(), n, policy_.stream());
      policy_.synchronize();
    }
  }
  std::optional<std::size_t> host_parameter_bytes() const override {
    if constexpr (kOffload) {
      const auto& plan = policy_.plan();
      return plan.streamed_blocks * policy_.group_encoded_bytes(policy_.model_layout().block(0));
    } else {
      return std::nullopt;
    }
  }
  std::optional<std::string> encoded_codec() const override {
    if constexpr (kSticky)
      return std::string(Policy::codec_type::name);
    else
      return std::nullopt;
  }
  std::size_t encoded_group_bytes(zo2::GroupIndex g) const override {
    if constexpr (kSticky)
      return policy_.group_encoded_bytes(g);
    else
      return Engine::encoded_group_bytes(g);
  }
  /// One group's codes and row scales (a checkpoint reads them one group at a time).
  void get_encoded_group(zo2::GroupIndex g, std::span<unsigned char> out) override {
    if constexpr (kSticky) {
      optimizer_.flush();
      policy_.get_group_encoded(g, out);
    } else {
      Engine::get_encoded_group(g, out);
    }
  }
  void set_encoded_group(zo2::GroupIndex g, std::span<const unsigned char> in) override {
    if constexpr (kSticky)
      policy_.set_group_encoded(g, in);
    else
      Engine::set_encoded_group(g, in);
  }

  zo2::OptimizerState state() const override { return optimizer_.state(); }
  std::string device_description() const override { return description_; }
  void set_communicator(zo2::Communicator* comm, zo2::DataParallel mode) override {
    optimizer_.set_communicator(comm, mode);
  }
  std::optional<std::size_t> device_memory_used() const override {
    std::size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return std::nullopt;
    return total_bytes - free_bytes;
  }
  std::uint64_t values_lost() const override {
    if constexpr (requires(const Policy& p) { p.escape_overflow(); })
      return policy_.escape_overflow();
    else
      return 0;
  }

 private:
  // --writeback-every 0: the first step warms up; the second is recorded (a streamed block's
  // visit at K = 1, for the notice); from the second on, each step's wall time goes to the trial,
  // which sets K before each step until it is done.
  void before_step() {
    if constexpr (kOffload) {
      if (!trial_) return;
      if (steps_run_ == 1) policy_.restart_timeline();
      trial_->apply_to(policy_);
      step_started_ = Clock::now();
    }
  }
  void after_step() {
    ++steps_run_;
    if constexpr (kOffload) {
      if (!trial_ || steps_run_ < 2) return;
      if (steps_run_ == 2) {
        policy_.end_timeline_visit();
        visit_ = policy_.block_timing();
        policy_.timeline().stop();
      }
      trial_->record(std::chrono::duration<double>(Clock::now() - step_started_).count());
      if (!trial_->done()) return;
      trial_->apply_to(policy_);
      const unsigned k = policy_.writeback_every();
      char line[512];
      std::snprintf(line, sizeof line,
                    "offload   write-back every %u step%s from here on: steps took %s; a streamed block's visit at "
                    "K = 1 took %.2f ms (%.2f ms of upload, %.2f ms of GPU time, its pass %.2f ms); link %.1f GB/s one "
                    "way, %.1f in duplex",
                    k, k == 1 ? "" : "s", trial_->summary().c_str(), visit_.period_ms, visit_.upload_ms,
                    visit_.compute_ms, visit_.pass_ms, link_.one_way_gbps, link_.duplex_gbps);
      notice_ = line;
      trial_.reset();
    }
  }

  /// The parameters into the policy, group by group. Offload: a group is read (drawn) in fp32,
  /// then encoded straight into the pinned host store; each of the two uses every core (the
  /// source's read_group, GroupCodec::encode_group), so the host holds the codec's store plus one
  /// group in fp32, never the model in fp32. Resident: each group is copied to the device.
  void load_parameters(const ParameterSource& parameters, bool report_progress) {
    const zo2::ModelLayout& ml = policy_.model_layout();
    const std::size_t groups = ml.num_groups();
    LoadProgress progress(report_progress);
    if constexpr (kOffload) {
      // A rank sharing its host's master reads and sets only its own groups (seat 0 the rest).
      std::vector<zo2::GroupIndex> own;
      for (std::size_t g = 0; g < groups; ++g)
        if (policy_.sets_group(zo2::GroupIndex{g})) own.push_back(zo2::GroupIndex{g});
      std::vector<float> flat;
      double read_s = 0, encode_s = 0;
      for (std::size_t i = 0; i < own.size(); ++i) {
        const auto read_start = Clock::now();
        flat.resize(ml.layout(own[i]).total_elements());
        parameters.read_group(own[i], flat);
        read_s += seconds_since(read_start);
        const auto encode_start = Clock::now();
        policy_.set_group(own[i], flat);
        encode_s += seconds_since(encode_start);
        progress.done(i + 1, own.size());
      }
      char line[128];
      std::snprintf(line, sizeof line, "%.1f s drawing or reading the weights, %.1f s encoding them", read_s, encode_s);
      loaded_report_ = line;
    } else {
      const auto read_start = Clock::now();
      std::vector<float> flat;
      for (std::size_t g = 0; g < groups; ++g) {
        const zo2::GroupIndex gi{g};
        flat.resize(ml.layout(gi).total_elements());
        parameters.read_group(gi, flat);
        if (!flat.empty()) zo2::gpu::copy_to_device(policy_.master(gi).data(), flat.data(), flat.size(), policy_.stream());
        policy_.synchronize();  // before the buffer is refilled
        progress.done(g + 1, groups);
      }
      char line[128];
      std::snprintf(line, sizeof line, "%.1f s drawing or reading the weights and copying them to the device",
                    seconds_since(read_start));
      loaded_report_ = line;
    }
  }
  using Clock = std::chrono::steady_clock;
  static double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

  /// A stderr line every kEverySeconds while loading: "load      12 of 66 groups (18%), 25 s".
  class LoadProgress {
   public:
    explicit LoadProgress(bool on) : on_(on) {}
    void done(std::size_t groups_done, std::size_t groups) {
      if (!on_ || groups_done == groups) return;
      const double s = seconds_since(start_);
      if (s < next_) return;
      next_ = s + kEverySeconds;
      std::fprintf(stderr, "load      %zu of %zu groups (%.0f%%), %.0f s\n", groups_done, groups,
                   100.0 * static_cast<double>(groups_done) / static_cast<double>(groups), s);
      std::fflush(stderr);
    }

   private:
    static constexpr double kEverySeconds = 15.0;
    bool on_;
    Clock::time_point start_ = Clock::now();
    double next_ = kEverySeconds;
  };

  Clock::time_point started_ = Clock::now();  // first: the engine's construction is timed from here
  Model model_;
  Policy policy_;
  zo2::ZOOptimizer<Model, Policy> optimizer_;
  typename Model::Batch batch_;
  std::vector<typename Model::Batch> micro_;  // accumulation's micro-batches, on the device
  typename Model::Activation hidden_[2];
  typename Model::Workspace workspace_;
  std::string description_;
  std::optional<zo2::offload::WritebackTrial> trial_;  // --writeback-every 0: K is still to choose
  zo2::offload::LinkHint link_{};
  zo2::offload::BlockTiming visit_{};
  Clock::time_point step_started_{};
  std::size_t steps_run_ = 0;
  std::optional<std::string> notice_;
  std::string loaded_report_, load_report_;  // where the load's time went: its parts, the whole
};

inline std::string gpu_name() {
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "cuda";
  return std::string("cuda (") + prop.name + ")";
}

template <class Model, class Codec, class Config>
std::unique_ptr<Engine> make_offload(const Config& config, const ParameterSource& parameters,
                                     const EngineOptions& options) {
  using T = typename Model::value_type;
  zo2::gpu::OffloadOptions offload;
  // The rule's state is planned with the masters (no re-plan when the optimizer reserves it).
  offload.rule_state_slots = zo2::rule_state_slots(zo2::ZOOptimizer<Model, zo2::gpu::HostOffload<Codec, T>>::rule_of(options.zo));
  if (options.gpu_memory_budget_gib)
    offload.gpu_memory_budget = static_cast<std::size_t>(*options.gpu_memory_budget_gib * 1024.0 * 1024.0 * 1024.0);
  // Deferred write-back (results unchanged); 0: the plan picks K from the link, measured here.
  offload.writeback_every = options.writeback_every;
  offload.rule_state_bf16 = options.state_bf16;
  offload.slots = options.slots;                                // --slots (a budget may add one)
  offload.one_perturbed_copy = !options.two_perturbed_copies;  // --two-copies
  // An untied LM head leaves the token embedding's perturbed copy unread after the prologue:
  // the blocks reuse its device memory.
  offload.prologue_scratch_shared = !zo2::models::ties_lm_head(config);
  using Master = zo2::gpu::SharedHostMaster<Codec, T>;
  const EngineOptions::SharedMaster* shared = options.shared_master ? &*options.shared_master : nullptr;
  const auto wait = std::chrono::milliseconds(shared ? static_cast<long long>(shared->wait_s * 1000.0) : 0);
  // K = 0: the link is measured here. A lone engine starts at K = 1 and chooses K by timing its
  // steps (WritebackTrial); a shared master's K is fixed when it is created (from the link
  // alone), and a rank that attaches to it takes the master's.
  std::optional<zo2::offload::LinkHint> trial_link;
  if (offload.writeback_every == 0) {
    if (shared && shared->seat != 0) {
      offload.writeback_every = Master::writeback_every_of(shared->name, wait);
    } else {
      offload.link = zo2::gpu::measure_link();
      if (!shared) {
        trial_link = offload.link;
        offload.writeback_every = 1;
        offload.record_timeline = true;
      }
    }
  }
  // The codec is both the precision the weights rest in on the host (the master) and the one
  // they cross PCIe in; the forward computes in T (--compute).
  std::string description = gpu_name() + ", offload: master and transfer " + Codec::name +
                            (Codec::row_scaled ? " (per-row scales)" : "") + ", forward " + compute_name<T>();
  if (options.state_bf16 && offload.rule_state_slots) description += ", optimizer state bf16";
  if (options.two_perturbed_copies) description += ", both perturbed copies on the GPU";
  if (options.gpu_memory_budget_gib) description += ", budget " + std::to_string(*options.gpu_memory_budget_gib) + " GiB";
  if (trial_link)
    description += ", write-back every K steps, K chosen by timing steps at K = 1, 2, 4, 8";
  else if (offload.writeback_every != 1)
    description += ", write-back every " + std::to_string(zo2::gpu::offload_detail::resolve_writeback_every(offload)) +
                   " step(s)" + (offload.writeback_every == 0 ? " (chosen from the link)" : "");
  using Offloaded = CudaEngine<Model, zo2::gpu::HostOffload<Codec, T>>;
  if (!shared) {
    auto engine = std::make_unique<Offloaded>(config, parameters, options, description, offload);
    if (trial_link) engine->choose_writeback_by_trial(*trial_link);
    return engine;
  }
  // This host's ranks share one pinned host master: seat 0 creates it, the others attach.
  const zo2::ModelLayout& layout = parameters.model_layout();
  Master master = [&] {
    try {
      return shared->seat == 0 ? Master::create_in_shared_memory(shared->name, layout, offload, shared->seats)
                               : Master::attach_to_shared_memory(shared->name, layout, offload, shared->seats, wait);
    } catch (const zo2::Error& e) {
      throw zo2::Error(std::string(e.what()) + " (--host-master per-rank gives each rank its own host master)");
    }
  }();
  master.set_wait_timeout(wait);
  description += ", host master shared by " + std::to_string(shared->seats) + " ranks (seat " +
                 std::to_string(shared->seat) + ")";
  return std::make_unique<Offloaded>(config, parameters, options, description, offload, cudaStream_t{nullptr},
                                     master.seat(shared->seat));
}


/// The engine of one family's CUDA model: resident, or offloaded with --codec.
template <class Model, class Config>
std::unique_ptr<Engine> make_family_engine(const Config& config, const ParameterSource& parameters,
                                           const EngineOptions& options) {
  check_device_available("cuda");
  using T = typename Model::value_type;
  if (!options.offload)  // an fp32 master on the device; the forward reads its copies in T
    return std::make_unique<CudaEngine<Model, zo2::gpu::CudaResident<float, T>>>(
        config, parameters, options, gpu_name() + ", forward " + compute_name<T>(), cudaStream_t{});  // a stream of its own
  const std::string codec = options.codec.empty() ? "fp32" : options.codec;
  if (codec == "fp32") return make_offload<Model, zo2::offload::Fp32Codec>(config, parameters, options);
  if (codec == "bf16") return make_offload<Model, zo2::offload::Bf16Codec>(config, parameters, options);
  if (codec == "fp16") return make_offload<Model, zo2::offload::Fp16Codec>(config, parameters, options);
  if (codec == "int8") return make_offload<Model, zo2::offload::Int8RowCodec>(config, parameters, options);
  if (codec == "bf16p") return make_offload<Model, zo2::offload::Bf16PackedCodec>(config, parameters, options);
  throw UsageError("--codec must be fp32, bf16, bf16p, fp16 or int8, got '" + codec + "'");
}

}  // namespace zo2_opt::cuda_engine
