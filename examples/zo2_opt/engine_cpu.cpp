// The CPU engine: OPTModel<float> (Eigen) + Resident<float, float> + ZOOptimizer.
#include <memory>

#include <zo2/zo2.hpp>
#include <zo2/models/opt/model.hpp>

#include "cli.hpp"
#include "engine.hpp"
#include "engine_rule_state.hpp"

namespace zo2_opt {

namespace {

using Model = zo2::opt::OPTModel<float>;

Model::Batch to_model_batch(const TokenBatch& b) {
  Model::Batch m;
  m.batch = b.batch;
  m.seq = b.seq;
  m.input_ids = b.input_ids;
  m.attention_mask = b.attention_mask;
  m.labels = b.labels;
  return m;
}

class CpuEngine final : public Engine {
 public:
  CpuEngine(const zo2::opt::OPTConfig& config, zo2::ParameterStore<float> store, const EngineOptions& options)
      : model_(config), store_(std::move(store)), policy_(store_),
        optimizer_(model_, policy_, options.zo, options.start_step) {}

  zo2::StepResult step(const TokenBatch& batch) override { return optimizer_.step(to_model_batch(batch)); }
  zo2::StepResult step_accumulated(std::span<const TokenBatch> micro) override {
    std::vector<Model::Batch> batches;
    for (const TokenBatch& b : micro) batches.push_back(to_model_batch(b));
    return optimizer_.step_accumulated(batches);
  }
  void restore_progress(const zo2::OptimizerState& saved) override { optimizer_.restore(saved); }
  RuleState rule_state() override {
    optimizer_.flush();
    return read_rule_state(policy_);
  }
  void set_rule_state(const RuleState& state) override { write_rule_state(policy_, state); }

  double loss(const TokenBatch& batch) override { return optimizer_.evaluate(to_model_batch(batch)); }

  std::vector<float> logits(std::span<const std::int32_t> ids) override {
    optimizer_.flush();
    Model::Batch b;
    b.batch = 1;
    b.seq = ids.size();
    b.input_ids.assign(ids.begin(), ids.end());
    const auto all = model_.logits(zo2::opt::param_set(store_), b, workspace_);  // row-major
    return std::vector<float>(all.data(), all.data() + all.size());
  }

  std::vector<double> score_candidates(std::span<const std::int32_t> prompt,
                                       const std::vector<std::vector<std::int32_t>>& candidates) override {
    optimizer_.flush();
    return model_.score_candidates(zo2::opt::param_set(store_), prompt, candidates, workspace_);
  }

  void flush() override { optimizer_.flush(); }
  const zo2::ParameterStore<float>& parameters() override {
    optimizer_.flush();
    return store_;
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
  Model::Workspace workspace_;
};

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(const zo2::opt::OPTConfig& config, zo2::ParameterStore<float> store,
                                        const EngineOptions& options) {
  if (options.offload)
    throw UsageError(cuda_built() ? "--offload streams weights to a GPU: it needs --device cuda"
                                  : "--offload: offload not available in this build (built without CUDA; the offload engine needs --device cuda)");
  return std::make_unique<CpuEngine>(config, std::move(store), options);
}

}  // namespace zo2_opt
