// zo2/models/candidates.hpp -- MeZO-style classification shared by the model families: the one
// batch that scores every candidate continuation of a prompt, and the sum of log-probabilities
// of each candidate's tokens read from its rows of the output.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <zo2/core/error.hpp>

namespace zo2::models {

/// One row per candidate: the prompt, then the candidate, right-padded with `pad_token_id` (0
/// when negative) to the longest; attention_mask 1 over prompt and candidate. Batch is a model's
/// host batch (batch, seq, input_ids, attention_mask). No candidates: a batch of 0 rows.
/// ShapeError for an empty prompt or an empty candidate.
template <class Batch>
Batch candidate_batch(std::span<const std::int32_t> prompt, const std::vector<std::vector<std::int32_t>>& candidates,
                      std::int64_t pad_token_id) {
  if (prompt.empty()) throw ShapeError("score_candidates: the prompt is empty");
  Batch batch;
  if (candidates.empty()) return batch;
  std::size_t longest = 0;
  for (std::size_t c = 0; c < candidates.size(); ++c) {
    if (candidates[c].empty()) throw ShapeError("score_candidates: candidate " + std::to_string(c) + " is empty");
    longest = std::max(longest, candidates[c].size());
  }
  batch.batch = candidates.size();
  batch.seq = prompt.size() + longest;
  const std::int32_t filler = pad_token_id >= 0 ? static_cast<std::int32_t>(pad_token_id) : 0;
  batch.input_ids.assign(batch.batch * batch.seq, filler);
  batch.attention_mask.assign(batch.batch * batch.seq, 0);
  for (std::size_t c = 0; c < candidates.size(); ++c) {
    std::int32_t* ids = batch.input_ids.data() + c * batch.seq;
    std::copy(prompt.begin(), prompt.end(), ids);
    std::copy(candidates[c].begin(), candidates[c].end(), ids + prompt.size());
    std::fill_n(batch.attention_mask.data() + c * batch.seq, prompt.size() + candidates[c].size(), 1);
  }
  return batch;
}

/// For each candidate c of a candidate_batch with `seq` columns: the sum over its tokens k of
/// log_prob(row, token), row = c * seq + prompt_size - 1 + k (the row whose output predicts it).
template <class LogProb>
std::vector<double> candidate_scores(std::size_t prompt_size, std::size_t seq,
                                     const std::vector<std::vector<std::int32_t>>& candidates, LogProb&& log_prob) {
  std::vector<double> scores(candidates.size(), 0.0);
  for (std::size_t c = 0; c < candidates.size(); ++c)
    for (std::size_t k = 0; k < candidates[c].size(); ++k)
      scores[c] += log_prob(c * seq + prompt_size - 1 + k, candidates[c][k]);
  return scores;
}

}  // namespace zo2::models
