// zo2/models/model_checks.hpp -- what every bundled model checks of its inputs, with the same
// messages on the CPU and the GPU: a parameter group laid out for the model's configuration,
// and a host batch's sizes and values (token ids in the vocabulary, mask values 0 or 1, labels
// in the vocabulary or -100). Each failure is a ShapeError naming the model or the family's
// batch, the field and the element ("LLaMA batch: input_ids[1][3] = 70000 is outside the
// vocabulary of 32000"). A batch is any type with batch, seq, input_ids, attention_mask and
// labels (and position_ids where the family has them), as the models' own Batch types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>

namespace zo2::models {

/// A forward was handed a group laid out for another configuration (or none at all): name the
/// model, the group and whose configuration it expected (`family`: "OPT", "LLaMA-family").
template <class T>
void check_group_layout(const ParamView<const T>& params, const ParamLayout& expected, const char* model,
                        const char* group, const char* family) {
  if (params.data() == nullptr && expected.total_elements() != 0)
    throw ShapeError(std::string(model) + ": no parameters given for the " + group);
  if (params.data() != nullptr && !(params.layout() == expected))
    throw ShapeError(std::string(model) + ": the " + group + " parameters were laid out for a different " + family +
                     " configuration");
}

/// "[b][s]" of token t in rows of `seq` tokens (built piece by piece: GCC 12 misreads
/// "[" + std::to_string(...) in some templates).
inline std::string token_at(std::size_t t, std::size_t seq) {
  std::string at("[");
  at += std::to_string(t / seq);
  at += "][";
  at += std::to_string(t % seq);
  at += "]";
  return at;
}

/// The batch's vectors against batch x seq: input_ids exactly; attention_mask, labels and (where
/// the batch has them) position_ids empty or exactly. `name` is the family's ("OPT batch").
template <class Batch>
void check_batch_sizes(const Batch& b, const char* name) {
  const std::size_t tokens = b.batch * b.seq;
  const std::string n(name);
  if (tokens == 0) throw ShapeError(n + ": batch and seq must be > 0");
  if (b.input_ids.size() != tokens)
    throw ShapeError(n + ": input_ids has " + std::to_string(b.input_ids.size()) + " entries, expected batch * seq = " +
                     std::to_string(tokens));
  auto empty_or_all = [&](std::size_t size, const char* field) {
    if (size != 0 && size != tokens)
      throw ShapeError(n + ": " + field + " has " + std::to_string(size) + " entries, expected batch * seq = " +
                       std::to_string(tokens) + " (or none)");
  };
  empty_or_all(b.attention_mask.size(), "attention_mask");
  empty_or_all(b.labels.size(), "labels");
  if constexpr (requires { b.position_ids; }) empty_or_all(b.position_ids.size(), "position_ids");
}

/// The labels the loss needs: one per token.
template <class Batch>
void check_labels_present(const Batch& b, const char* name) {
  if (b.labels.size() != b.batch * b.seq)
    throw ShapeError(std::string(name) + ": labels has " + std::to_string(b.labels.size()) +
                     " entries, expected batch * seq = " + std::to_string(b.batch * b.seq));
}

/// Token t's id in [0, vocab) and, when the batch has a mask, its mask value 0 or 1.
template <class Batch>
void check_token(const Batch& b, std::size_t t, std::int64_t vocab, const char* name) {
  const auto id = static_cast<std::int64_t>(b.input_ids[t]);
  if (id < 0 || id >= vocab)
    throw ShapeError(std::string(name) + ": input_ids" + token_at(t, b.seq) + " = " + std::to_string(id) +
                     " is outside the vocabulary of " + std::to_string(vocab));
  if (!b.attention_mask.empty() && b.attention_mask[t] != 0 && b.attention_mask[t] != 1)
    throw ShapeError(std::string(name) + ": attention_mask" + token_at(t, b.seq) + " must be 0 or 1");
}

/// Token t's label: -100 (ignored) or in [0, vocab).
template <class Batch>
void check_label(const Batch& b, std::size_t t, std::int64_t vocab, const char* name) {
  const auto label = static_cast<std::int64_t>(b.labels[t]);
  if (label != -100 && (label < 0 || label >= vocab))
    throw ShapeError(std::string(name) + ": labels" + token_at(t, b.seq) + " = " + std::to_string(label) +
                     " is outside the vocabulary (or -100 to ignore)");
}

}  // namespace zo2::models
