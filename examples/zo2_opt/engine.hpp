// zo2-opt: a model, its parameters and a MeZO-SGD optimizer on one device. The commands (train,
// eval, generate) talk to this interface only; engine_cpu.cpp implements it with the CPU
// reference model and the Resident policy, engine_cuda.cu with the CUDA model.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <zo2/core/config.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>
#include <zo2/optim/zo_optimizer.hpp>

#include "data.hpp"

namespace zo2_opt {

struct EngineOptions {
  std::string device = "cpu";  // "cpu" | "cuda"
  bool offload = false;
  std::string codec;                    // offload codec name; empty: the default
  std::optional<double> gpu_memory_budget_gib;
  zo2::ZOConfig zo;
  std::uint64_t start_step = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;
  /// One MeZO-SGD step.
  virtual zo2::StepResult step(const TokenBatch& batch) = 0;
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
  /// theta on the host (flushes and, on a device, downloads first).
  virtual const zo2::ParameterStore<float>& parameters() = 0;
  virtual zo2::OptimizerState state() const = 0;
  virtual std::string device_description() const = 0;
  /// Bytes of device memory in use, when there is a device.
  virtual std::optional<std::size_t> device_memory_used() const { return std::nullopt; }
};

std::unique_ptr<Engine> make_cpu_engine(const zo2::opt::OPTConfig& config, zo2::ParameterStore<float> store,
                                        const EngineOptions& options);
/// Defined in engine_cuda.cu in CUDA builds; otherwise throws "built without CUDA".
std::unique_ptr<Engine> make_cuda_engine(const zo2::opt::OPTConfig& config, zo2::ParameterStore<float> store,
                                         const EngineOptions& options);
bool cuda_built();

inline std::unique_ptr<Engine> make_engine(const zo2::opt::OPTConfig& config, zo2::ParameterStore<float> store,
                                           const EngineOptions& options) {
  if (options.device == "cuda") return make_cuda_engine(config, std::move(store), options);
  return make_cpu_engine(config, std::move(store), options);
}

}  // namespace zo2_opt
