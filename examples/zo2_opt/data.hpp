// zo2-opt: datasets and batches.
//
// Formats: plain text (cut into windows of --seq-len tokens, each starting with the tokenizer's
// bos when it has one: OPT's </s>, LLaMA's <s>; Qwen's tokenizers have none);
// JSONL with {"text": ...} (language modelling), {"prompt": ..., "label": ...} (classification
// as MeZO does it: the loss is on the label's candidate tokens only), or pre-tokenized
// {"input_ids": [...], "labels": [...]?}.
//
// Batch selection is a pure function of (seed, step): every epoch is a permutation of the
// examples drawn from (seed, epoch), and step t takes positions [t*B, (t+1)*B) of the endless
// sequence of epochs. A resumed run therefore sees exactly the batches the uninterrupted run
// would have seen, with no sampler state to save.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer.hpp"

namespace zo2_opt {

inline constexpr std::int32_t kIgnore = -100;

struct Example {
  std::vector<std::int32_t> ids;
  std::vector<std::int32_t> labels;  // aligned with ids (position s+1 is predicted from s); -100 = ignored
  int label_index = -1;              // classification: the gold candidate
  std::size_t prompt_length = 0;     // classification: ids[0, prompt_length) is the prompt
  std::string origin;                // "file:line"
};

enum class TaskKind { language_model, classification };

struct Dataset {
  TaskKind kind = TaskKind::language_model;
  std::vector<Example> examples;
  std::vector<std::string> candidates;
  std::vector<std::vector<std::int32_t>> candidate_ids;
  std::string source;
  std::size_t truncated = 0;  // examples cut to --seq-len
};

struct DataOptions {
  std::size_t seq_len = 128;
  std::int64_t max_positions = 2048;
  std::int64_t vocab_size = 0;
  std::string template_text = "{prompt}";
  std::vector<std::string> candidates;
};

/// Loads a dataset file: JSONL when the name ends in .jsonl or .json (unless plain_text), else
/// plain text. `tokenizer` may be null for pre-tokenized data; text then is an error.
Dataset load_dataset(const std::filesystem::path& path, bool plain_text, const Tokenizer* tokenizer,
                     const DataOptions& options);

/// Plain text already in memory (the embedded demo corpus), cut into windows.
Dataset text_windows(std::string_view text, const std::string& source, const Tokenizer& tokenizer,
                     const DataOptions& options);

/// Prompt ids of a classification line (for scoring): template(prompt) with the tokenizer's special
/// tokens (OPT: a leading </s>).
std::vector<std::int32_t> prompt_ids(const Tokenizer& tokenizer, const std::string& template_text,
                                     const std::string& prompt);

/// A padded batch ([batch, seq] row-major, right padding).
struct TokenBatch {
  std::size_t batch = 0, seq = 0;
  std::vector<std::int32_t> input_ids, attention_mask, labels;
  std::size_t real_tokens() const;
  std::size_t target_tokens() const;  // labels that the loss counts
};

TokenBatch make_batch(const Dataset& data, std::span<const std::size_t> indices, std::int32_t pad_id);

/// The batch schedule: indices of step t's examples, a pure function of (seed, t).
class BatchSchedule {
 public:
  BatchSchedule(std::size_t num_examples, std::size_t batch_size, std::uint64_t seed);
  std::vector<std::size_t> indices(std::uint64_t step) const;

 private:
  const std::vector<std::size_t>& permutation(std::uint64_t epoch) const;
  std::size_t n_, batch_;
  std::uint64_t seed_;
  mutable std::map<std::uint64_t, std::vector<std::size_t>> cache_;
};

}  // namespace zo2_opt
