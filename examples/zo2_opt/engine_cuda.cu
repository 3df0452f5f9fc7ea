// The CUDA engine (built when ZO2_ENABLE_CUDA is on): the family's CUDA model (OPTCudaModel<float>
// or LlamaCudaModel<float>: CudaEngine<Model, Policy>, one template for both) with the weights on
// the GPU (zo2::cuda::CudaResident), or streamed from host memory (zo2::cuda::HostOffload, ZO2's
// offload engine) with --offload. Everything the model enqueues runs on the policy's stream.
// Training, evaluation and generation all run under either policy: evaluation and logits take
// every group through the policy's current() in order (a streamed block passes through a slot,
// unperturbed, and is not written back), so a model larger than the GPU is evaluated and sampled
// as it is trained. One device Batch is refilled for every call (no allocation once it is as
// large as the largest batch so far).
#include <cuda_runtime.h>

#include <memory>
#include <string>

#include <zo2/zo2.hpp>
#include <zo2/models/llama/cuda/llama_cuda_model.cuh>
#include <zo2/models/opt/cuda/opt_cuda_model.cuh>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/packed_bf16.hpp>
#include <zo2/offload/cuda_resident.cuh>
#include <zo2/offload/host_offload.cuh>
#include <zo2/offload/link_probe.cuh>

#include "cli.hpp"
#include "engine.hpp"
#include "engine_rule_state.hpp"
#include "options.hpp"

namespace zo2_opt {

namespace {

template <class Model, class Policy>
class CudaEngine final : public Engine {
  /// Whether float parameters alone would not restore the policy exactly (row-scaled codecs).
  static constexpr bool kSticky = [] {
    if constexpr (requires { Policy::codec_type::row_scaled; }) return Policy::codec_type::row_scaled;
    else return false;
  }();

 public:
  template <class Config, class... PolicyArgs>
  CudaEngine(const Config& config, zo2::ParameterStore<float> store, const EngineOptions& options,
             std::string description, PolicyArgs&&... policy_args)
      : host_(std::move(store)), model_(config), policy_(host_, std::forward<PolicyArgs>(policy_args)...),
        optimizer_((model_.set_stream(policy_.stream()), model_), policy_, options.zo, options.start_step),
        description_(std::move(description)) {
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
    return optimizer_.step(batch_);
  }
  /// Every micro-batch is on the device at once (token ids only; activations are one batch's).
  zo2::StepResult step_accumulated(std::span<const TokenBatch> micro) override {
    if (micro_.size() < micro.size()) micro_.resize(micro.size());
    for (std::size_t i = 0; i < micro.size(); ++i) model_.upload_batch(micro[i], micro_[i]);
    return optimizer_.step_accumulated(std::span<const typename Model::Batch>(micro_.data(), micro.size()));
  }
  void restore_progress(const zo2::OptimizerState& saved) override { optimizer_.restore(saved); }
  RuleState rule_state() override {
    optimizer_.flush();
    return read_rule_state(policy_);
  }
  void set_rule_state(const RuleState& state) override { write_rule_state(policy_, state); }
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
  const zo2::ParameterStore<float>& parameters() override {
    optimizer_.flush();
    if constexpr (std::is_same_v<Policy, zo2::cuda::CudaResident<float, float>>) policy_.download(host_);
    else policy_.store_to(host_);
    return host_;
  }
  std::optional<EncodedState> encoded_state() override {
    if constexpr (kSticky) {
      optimizer_.flush();
      EncodedState st{Policy::codec_type::name, {}};
      const auto& ml = policy_.model_layout();
      for (std::size_t g = 0; g < ml.num_groups(); ++g) {
        std::vector<unsigned char> bytes(policy_.group_encoded_bytes(zo2::GroupIndex{g}));
        policy_.get_group_encoded(zo2::GroupIndex{g}, bytes);
        st.groups.push_back(std::move(bytes));
      }
      return st;
    } else {
      return std::nullopt;
    }
  }
  void restore_encoded_state(const EncodedState& st) override {
    if constexpr (kSticky) {
      const auto& ml = policy_.model_layout();
      if (st.codec != Policy::codec_type::name || st.groups.size() != ml.num_groups())
        throw zo2::Error("encoded state of codec '" + st.codec + "' with " + std::to_string(st.groups.size()) +
                         " groups does not fit this run (codec " + Policy::codec_type::name + ", " +
                         std::to_string(ml.num_groups()) + " groups)");
      for (std::size_t g = 0; g < ml.num_groups(); ++g) policy_.set_group_encoded(zo2::GroupIndex{g}, st.groups[g]);
    } else {
      Engine::restore_encoded_state(st);
    }
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
  zo2::ParameterStore<float> host_;
  Model model_;
  Policy policy_;
  zo2::ZOOptimizer<Model, Policy> optimizer_;
  typename Model::Batch batch_;
  std::vector<typename Model::Batch> micro_;  // accumulation's micro-batches, on the device
  typename Model::Activation hidden_[2];
  typename Model::Workspace workspace_;
  std::string description_;
};

std::string gpu_name() {
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "cuda";
  return std::string("cuda (") + prop.name + ")";
}

template <class Model, class Codec, class Config>
std::unique_ptr<Engine> make_offload(const Config& config, zo2::ParameterStore<float> store,
                                     const EngineOptions& options) {
  zo2::cuda::OffloadOptions offload;
  // The rule's state is planned with the masters (no re-plan when the optimizer reserves it).
  offload.rule_state_slots = zo2::rule_state_slots(zo2::ZOOptimizer<Model, zo2::cuda::HostOffload<Codec, float>>::rule_of(options.zo));
  if (options.gpu_memory_budget_gib)
    offload.gpu_memory_budget = static_cast<std::size_t>(*options.gpu_memory_budget_gib * 1024.0 * 1024.0 * 1024.0);
  // Deferred write-back (results unchanged); 0: the plan picks K from the link, measured here.
  offload.writeback_every = options.writeback_every;
  if (offload.writeback_every == 0) offload.link = zo2::cuda::measure_link();
  // The codec is both the precision the weights rest in on the host (the master) and the one
  // they cross PCIe in; the forward computes in fp32 (OPTCudaModel<float>, LlamaCudaModel<float>).
  std::string description = gpu_name() + ", offload: master and transfer " + Codec::name +
                            (Codec::row_scaled ? " (per-row scales)" : "") + ", forward fp32";
  if (options.gpu_memory_budget_gib) description += ", budget " + std::to_string(*options.gpu_memory_budget_gib) + " GiB";
  if (offload.writeback_every != 1)
    description += ", write-back every " + std::to_string(zo2::cuda::offload_detail::resolve_writeback_every(offload)) +
                   " step(s)" +
                   (offload.writeback_every == 0 ? " (link " + std::to_string(offload.link.one_way_gbps) + " GB/s one-way, " +
                                                       std::to_string(offload.link.duplex_gbps) + " in duplex)"
                                                 : std::string());
  return std::make_unique<CudaEngine<Model, zo2::cuda::HostOffload<Codec, float>>>(config, std::move(store), options,
                                                                                    description, offload);
}

}  // namespace

bool cuda_built() { return true; }

bool cuda_device_present() { return zo2::cuda::device_available(); }

void check_device_available(const std::string& device) {
  if (device != "cuda") return;
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0)
    throw UsageError(std::string("--device cuda: no CUDA GPU is present (") +
                     (rc != cudaSuccess ? cudaGetErrorString(rc) : "cudaGetDeviceCount found 0 devices") + ")");
}

/// The engine of one family's CUDA model: resident, or offloaded with --codec.
template <class Model, class Config>
std::unique_ptr<Engine> make_family_engine(const Config& config, zo2::ParameterStore<float> store,
                                           const EngineOptions& options) {
  check_device_available("cuda");
  if (!options.offload)
    return std::make_unique<CudaEngine<Model, zo2::cuda::CudaResident<float, float>>>(config, std::move(store), options,
                                                                                      gpu_name());
  const std::string codec = options.codec.empty() ? "fp32" : options.codec;
  if (codec == "fp32") return make_offload<Model, zo2::offload::Fp32Codec>(config, std::move(store), options);
  if (codec == "bf16") return make_offload<Model, zo2::offload::Bf16Codec>(config, std::move(store), options);
  if (codec == "fp16") return make_offload<Model, zo2::offload::Fp16Codec>(config, std::move(store), options);
  if (codec == "int8") return make_offload<Model, zo2::offload::Int8RowCodec>(config, std::move(store), options);
  if (codec == "bf16p") return make_offload<Model, zo2::offload::Bf16PackedCodec>(config, std::move(store), options);
  throw UsageError("--codec must be fp32, bf16, bf16p, fp16 or int8, got '" + codec + "'");
}

std::unique_ptr<Engine> make_cuda_engine(const zo2::opt::OPTConfig& config, zo2::ParameterStore<float> store,
                                         const EngineOptions& options) {
  return make_family_engine<zo2::opt::OPTCudaModel<float>>(config, std::move(store), options);
}

std::unique_ptr<Engine> make_cuda_engine(const zo2::llama::LlamaConfig& config, zo2::ParameterStore<float> store,
                                         const EngineOptions& options) {
  return make_family_engine<zo2::llama::LlamaCudaModel<float>>(config, std::move(store), options);
}

}  // namespace zo2_opt
