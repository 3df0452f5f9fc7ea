#include "options.hpp"

#include <algorithm>

namespace zo2_opt {

std::string parse_device(const Args& args) {
  std::string device = args.str("--device", "auto");
  if (device == "auto") device = cuda_device_present() ? "cuda" : "cpu";
  if (device != "cpu" && device != "cuda")
    throw UsageError(args.command() + ": --device must be auto, cpu or cuda, got '" + device + "'");
  check_device_available(device);
  return device;
}

std::string parse_compute(const Args& args, const std::string& device, const std::string& fallback) {
  const std::string compute = args.str("--compute", fallback);
  if (compute != "fp32" && compute != "bf16")
    throw UsageError(args.command() + ": --compute must be fp32 or bf16, got '" + compute + "'");
  if (args.has("--compute") && device != "cuda")
    throw UsageError(args.command() + ": --compute applies only with --device cuda (the CPU computes in fp32)");
  return device == "cuda" ? compute : "fp32";
}

OptionSpec compute_option_spec() {
  return {"--compute", "fp32|bf16",
          "with --device cuda: the forward's precision. fp32: exact, as the CPU and transformers compute; bf16: "
          "tensor cores, several times faster (the benchmarks' setting). The weights, their updates and "
          "checkpoints keep the master's precision either way",
          "fp32"};
}

DataOptions data_options_from(const Args& args, const ModelConfig& config, std::int64_t default_cap) {
  DataOptions o;
  const std::int64_t seq = args.integer("--seq-len", std::min(config.max_position_embeddings(), default_cap));
  if (seq < 2) throw UsageError(args.command() + ": --seq-len must be >= 2, got " + std::to_string(seq));
  if (seq > config.max_position_embeddings())
    throw UsageError(args.command() + ": --seq-len " + std::to_string(seq) + " is longer than the model's max_position_embeddings = " +
                     std::to_string(config.max_position_embeddings()));
  o.seq_len = static_cast<std::size_t>(seq);
  o.max_positions = config.max_position_embeddings();
  o.vocab_size = config.vocab_size();
  o.template_text = args.str("--template", "{prompt}");
  if (args.has("--candidates")) {
    o.candidates = split_list(*args.get("--candidates"));
    if (o.candidates.size() < 2) throw UsageError(args.command() + ": --candidates needs at least two label words, e.g. \"great,terrible\"");
  }
  return o;
}

void check_tokenizer_fits(const Args& args, const Tokenizer& tokenizer, const ModelConfig& config) {
  if (tokenizer.vocab_size() > static_cast<std::size_t>(config.vocab_size()))
    throw UsageError(args.command() + ": the tokenizer (" + tokenizer.description() + ") has " +
                     std::to_string(tokenizer.vocab_size()) + " tokens, more than the model's vocab_size = " +
                     std::to_string(config.vocab_size()));
}

}  // namespace zo2_opt
