// The CPU engine: the family's CPU model (OPTModel<float> or LlamaModel<float>, Eigen) +
// Resident<float, float> + ZOOptimizer. One template, CpuEngine<Model>; what differs between
// families is said by CpuFamily<Model> (the host batch and the whole-model conveniences).
#include <memory>
#include <type_traits>

#include <zo2/zo2.hpp>
#include <zo2/models/llama/model.hpp>
#include <zo2/models/opt/model.hpp>

#include "cli.hpp"
#include "engine.hpp"
#include "engine_rule_state.hpp"

namespace zo2_opt {

namespace {

/// A family's adapter: its model's Batch from zo2-opt's TokenBatch (right padding, labels -100
/// where ignored), and the parameter set its logits() and score_candidates() read. Both bundled
/// families take the same fields (the LLaMA family's rotary positions are 0..seq-1 per row, as
/// transformers' forward uses them with right padding), so one definition serves both; a family
/// whose batch differs specializes it.
template <class Model>
struct CpuFamily {
  using Batch = typename Model::Batch;

  static Batch batch(const TokenBatch& b) {
    Batch m;
    m.batch = b.batch;
    m.seq = b.seq;
    m.input_ids = b.input_ids;
    m.attention_mask = b.attention_mask;
    m.labels = b.labels;
    return m;
  }

  /// One unpadded sequence, no labels (for logits).
  static Batch sequence(std::span<const std::int32_t> ids) {
    Batch m;
    m.batch = 1;
    m.seq = ids.size();
    m.input_ids.assign(ids.begin(), ids.end());
    return m;
  }

  static auto params(const zo2::ParameterStore<float>& store) { return zo2::opt::param_set(store); }
};

// Without it a stateful rule's state would silently be left out of checkpoints.
static_assert(PolicyWithRuleState<zo2::Resident<float, float>>);

template <class Model>
class CpuEngine final : public Engine {
  using Family = CpuFamily<Model>;

 public:
  template <class Config>
  CpuEngine(const Config& config, zo2::ParameterStore<float> store, const EngineOptions& options)
      : model_(config), store_(std::move(store)), policy_(store_),
        optimizer_(model_, policy_, options.zo, options.start_step) {}

  zo2::StepResult step(const TokenBatch& batch) override { return optimizer_.step(Family::batch(batch)); }
  zo2::StepResult step_accumulated(std::span<const TokenBatch> micro) override {
    std::vector<typename Model::Batch> batches;
    for (const TokenBatch& b : micro) batches.push_back(Family::batch(b));
    return optimizer_.step_accumulated(batches);
  }
  void restore_progress(const zo2::OptimizerState& saved) override { optimizer_.restore(saved); }
  unsigned rule_state_slots() const override { return policy_rule_state_slots(policy_); }
  void get_rule_state_group(zo2::GroupIndex g, std::span<float> out) override {
    optimizer_.flush();
    policy_get_rule_state(policy_, g, out);
  }
  void set_rule_state_group(zo2::GroupIndex g, std::span<const float> in) override {
    policy_set_rule_state(policy_, g, in);
  }

  double loss(const TokenBatch& batch) override { return optimizer_.evaluate(Family::batch(batch)); }

  std::vector<float> logits(std::span<const std::int32_t> ids) override {
    optimizer_.flush();
    const auto all = model_.logits(Family::params(store_), Family::sequence(ids), workspace_);  // row-major
    return std::vector<float>(all.data(), all.data() + all.size());
  }

  std::vector<double> score_candidates(std::span<const std::int32_t> prompt,
                                       const std::vector<std::vector<std::int32_t>>& candidates) override {
    optimizer_.flush();
    return model_.score_candidates(Family::params(store_), prompt, candidates, workspace_);
  }

  void flush() override { optimizer_.flush(); }
  const zo2::ModelLayout& model_layout() const override { return store_.model_layout(); }
  void read_group(zo2::GroupIndex g, std::span<float> flat) override {
    optimizer_.flush();
    store_reader(store_)(g, flat);
  }
  zo2::OptimizerState state() const override { return optimizer_.state(); }
  std::string device_description() const override { return "cpu"; }
  void set_communicator(zo2::Communicator* comm, zo2::DataParallel mode) override {
    optimizer_.set_communicator(comm, mode);
  }

 private:
  Model model_;
  zo2::ParameterStore<float> store_;
  zo2::Resident<float, float> policy_;
  zo2::ZOOptimizer<Model> optimizer_;
  typename Model::Workspace workspace_;
};

}  // namespace

void check_cpu_engine_options(const EngineOptions& options) {
  if (options.offload)
    throw UsageError(cuda_built() ? "--offload streams weights to a GPU: it needs --device cuda"
                                  : "--offload: offload not available in this build (built without CUDA; the offload engine needs --device cuda)");
}

std::unique_ptr<Engine> make_cpu_engine(const ModelConfig& config, zo2::ParameterStore<float> store,
                                        const EngineOptions& options) {
  check_cpu_engine_options(options);
  return config.visit([&](const auto& c) -> std::unique_ptr<Engine> {
    if constexpr (std::is_same_v<std::decay_t<decltype(c)>, zo2::opt::OPTConfig>)
      return std::make_unique<CpuEngine<zo2::opt::OPTModel<float>>>(c, std::move(store), options);
    else
      return std::make_unique<CpuEngine<zo2::llama::LlamaModel<float>>>(c, std::move(store), options);
  });
}

}  // namespace zo2_opt
