// zo2-opt: evaluation over a dataset: mean token loss (and perplexity), and for classification
// MeZO's accuracy: the candidate with the highest log-likelihood given the prompt.
#pragma once

#include <cstddef>
#include <functional>
#include <optional>

#include "data.hpp"
#include "engine.hpp"

namespace zo2_opt {

struct EvalResult {
  double loss = 0;            // mean over target tokens
  std::size_t tokens = 0;     // target tokens
  std::size_t examples = 0;
  std::optional<double> accuracy;
};

/// Evaluates the first `limit` examples (all when 0). `per_example`, when set, is called with
/// each example's index and mean token loss (examples then run one at a time).
EvalResult evaluate_dataset(Engine& engine, const Dataset& data, std::size_t batch_size, std::int32_t pad_id,
                            std::size_t limit = 0,
                            const std::function<void(std::size_t, double, std::size_t)>& per_example = {});

}  // namespace zo2_opt
