// libFuzzer harness: zo2-opt's datasets (examples/zo2_opt/data.cpp): JSONL lines of
// {"text"}, {"prompt", "label"} or {"input_ids", "labels"}, and plain text cut into windows,
// with the built-in byte tokenizer. The input's first byte picks the options (plain text or
// JSONL, --seq-len, the model's vocabulary and positions, --candidates, --template); the rest is
// the file. An accepted dataset must hold examples that fit the options, and batch.
#include <algorithm>
#include <numeric>

#include "data.hpp"
#include "fuzz_common.hpp"
#include "tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  zo2_fuzz::clear_scratch();
  const unsigned pick = data[0];
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  const bool plain_text = pick & 1;
  zo2_opt::DataOptions options;
  static constexpr std::size_t kSeqLens[] = {2, 3, 8, 64};
  options.seq_len = kSeqLens[(pick >> 1) & 3];
  options.max_positions = (pick & 8) ? static_cast<std::int64_t>(options.seq_len) : 2048;
  options.vocab_size = (pick & 16) ? zo2_opt::Tokenizer::kByteVocabSize : 50272;
  switch ((pick >> 5) & 3) {
    case 0: break;  // no --candidates
    case 1: options.candidates = {"great", "terrible"}; break;
    case 2: options.candidates = {"yes", "no", "maybe"}; break;
    default: options.candidates = {"a long candidate that does not fit", "b"}; break;
  }
  options.template_text = (pick & 128) ? "{prompt} It was" : "{prompt}";
  const auto path = zo2_fuzz::write_scratch(plain_text ? "data.txt" : "data.jsonl", body);
  const zo2_opt::Tokenizer tokenizer = zo2_opt::Tokenizer::bytes();
  try {
    const zo2_opt::Dataset d = zo2_opt::load_dataset(path, plain_text, &tokenizer, options);
    ZO2_FUZZ_CHECK(!d.examples.empty());
    for (const zo2_opt::Example& e : d.examples) {
      ZO2_FUZZ_CHECK(!e.ids.empty() && e.ids.size() <= options.seq_len);
      ZO2_FUZZ_CHECK(static_cast<std::int64_t>(e.ids.size()) <= options.max_positions);
      ZO2_FUZZ_CHECK(e.labels.size() == e.ids.size());
      for (const std::int32_t id : e.ids) ZO2_FUZZ_CHECK(id >= 0 && id < options.vocab_size);
      for (const std::int32_t label : e.labels)
        ZO2_FUZZ_CHECK(label == zo2_opt::kIgnore || (label >= 0 && label < options.vocab_size));
      if (d.kind == zo2_opt::TaskKind::classification) {
        ZO2_FUZZ_CHECK(e.label_index >= 0 && static_cast<std::size_t>(e.label_index) < d.candidates.size());
        const auto& cand = d.candidate_ids.at(static_cast<std::size_t>(e.label_index));
        ZO2_FUZZ_CHECK(e.prompt_length >= 1 && e.prompt_length + cand.size() == e.ids.size());
        ZO2_FUZZ_CHECK(std::equal(cand.begin(), cand.end(), e.ids.begin() + static_cast<std::ptrdiff_t>(e.prompt_length)));
      }
    }
    // Batches of up to 4 examples from the schedule, padded.
    const std::size_t batch = std::min<std::size_t>(4, d.examples.size());
    const zo2_opt::BatchSchedule schedule(d.examples.size(), batch, pick);
    for (std::uint64_t step = 0; step < 3; ++step) {
      const std::vector<std::size_t> indices = schedule.indices(step);
      ZO2_FUZZ_CHECK(indices.size() == batch);
      const zo2_opt::TokenBatch b = zo2_opt::make_batch(d, indices, 1);
      ZO2_FUZZ_CHECK(b.input_ids.size() == b.batch * b.seq && b.labels.size() == b.input_ids.size());
      ZO2_FUZZ_CHECK(b.real_tokens() <= b.input_ids.size() && b.target_tokens() <= b.real_tokens());
    }
  } catch (const zo2::Error&) {
  }
  return 0;
}
